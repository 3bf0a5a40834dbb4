"""The HTTP/JSON API: thin routers over the domain rules and the runtime."""
