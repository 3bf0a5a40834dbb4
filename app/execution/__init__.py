"""Getting tasks executed: dispatching TODO tasks to runners, and reclaiming tasks whose
runner stopped renewing its lease. The runners themselves live in the top-level `runner`
package; they talk to this side only through NATS and the HTTP API."""
