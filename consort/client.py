"""`Client` (blocking) and `AsyncClient` (asyncio): the Consort API as typed methods.

Both classes get their methods from one table, `_Api`: each entry wraps an operation of
`consort._ops` (a sans-I/O generator, see `consort._protocol`), and the descriptor binds it
to the class's driver. The two drivers below are the only code that differs between the
blocking and the asyncio client: how a request is sent, how a stream is read, how to sleep.

    with Client("http://127.0.0.1:8000", token) as client:
        plan = client.add_compute_plan("round 1", tasks, batch_size=500)
        client.wait_compute_plan(plan.plan.key, timeout=3600)
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Coroutine,
    Generator,
    Iterator,
)
from types import TracebackType
from typing import Any, Generic, ParamSpec, TypeVar, overload

import httpx

from consort import _ops as ops
from consort import models as m
from consort import profiles
from consort._protocol import (
    CLOSE_STREAM,
    NEXT_LINE,
    Attempts,
    Call,
    DownloadFile,
    Emit,
    Instruction,
    Op,
    OpenStream,
    Retry,
    RetryPolicy,
    Sleep,
    check,
    drive_step,
    request_kwargs,
)
from consort.errors import ConsortError

P = ParamSpec("P")
T = TypeVar("T")
Y = TypeVar("Y")
STREAM_READ_TIMEOUT = 60.0  # the server sends a keep-alive every 15 s
# Idle connections are dropped before the server's keep-alive timeout (uvicorn: 5 s) could
# close one under a request being sent on it.
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20,
                              keepalive_expiry=2.0)


class _Done(Generic[T]):
    def __init__(self, value: T) -> None:
        self.value = value


class _Method(Generic[P, T]):
    """An operation exposed as a method: `Client` runs it to completion, `AsyncClient`
    returns a coroutine."""

    def __init__(self, op: Callable[P, Op[T]]) -> None:
        self.op = op
        self.__doc__ = op.__doc__
        self.__name__ = op.__name__

    @overload
    def __get__(self, instance: None, owner: type) -> _Method[P, T]: ...
    @overload
    def __get__(self, instance: Client, owner: type) -> Callable[P, T]: ...
    @overload
    def __get__(
        self, instance: AsyncClient, owner: type
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...
    def __get__(self, instance: object, owner: type) -> Any:
        if instance is None:
            return self
        assert isinstance(instance, Client | AsyncClient)
        return instance._method(self.op)


class _Iterator(Generic[P, Y]):
    """An operation that emits values, exposed as an iterator (async iterator)."""

    def __init__(self, op: Callable[P, Op[None]], item: type[Y]) -> None:
        self.op = op
        self.__doc__ = op.__doc__
        self.__name__ = op.__name__

    @overload
    def __get__(self, instance: None, owner: type) -> _Iterator[P, Y]: ...
    @overload
    def __get__(self, instance: Client, owner: type) -> Callable[P, Iterator[Y]]: ...
    @overload
    def __get__(self, instance: AsyncClient, owner: type) -> Callable[P, AsyncIterator[Y]]: ...
    def __get__(self, instance: object, owner: type) -> Any:
        if instance is None:
            return self
        assert isinstance(instance, Client | AsyncClient)
        return instance._iterator(self.op)


class _Api:
    """Every endpoint, once (see `consort._ops` for each one's documentation)."""

    # organizations, tokens, identity
    register_organization = _Method(ops.register_organization)
    iter_organizations = _Iterator(ops.iter_organizations, m.Organization)
    get_organization = _Method(ops.get_organization)
    issue_token = _Method(ops.issue_token)
    iter_tokens = _Iterator(ops.iter_tokens, m.TokenInfo)
    revoke_token = _Method(ops.revoke_token)
    me = _Method(ops.me)
    health = _Method(ops.health)
    # files and assets
    upload_file = _Method(ops.upload_file)
    add_data_manager = _Method(ops.add_data_manager)
    iter_data_managers = _Iterator(ops.iter_data_managers, m.DataManager)
    get_data_manager = _Method(ops.get_data_manager)
    download_opener = _Method(ops.download_opener)
    add_data_sample = _Method(ops.add_data_sample)
    link_data_sample = _Method(ops.link_data_sample)
    iter_data_samples = _Iterator(ops.iter_data_samples, m.DataSample)
    get_data_sample = _Method(ops.get_data_sample)
    add_function = _Method(ops.add_function)
    iter_functions = _Iterator(ops.iter_functions, m.Function)
    get_function = _Method(ops.get_function)
    download_function_archive = _Method(ops.download_function_archive)
    add_dataset = _Method(ops.add_dataset)
    iter_datasets = _Iterator(ops.iter_datasets, m.Dataset)
    get_dataset = _Method(ops.get_dataset)
    download_dataset_file = _Method(ops.download_dataset_file)
    download_dataset_zip = _Method(ops.download_dataset_zip)
    # compute plans
    add_compute_plan = _Method(ops.add_compute_plan)
    add_tasks = _Method(ops.add_tasks)
    get_compute_plan = _Method(ops.get_compute_plan)
    iter_compute_plans = _Iterator(ops.iter_compute_plans, m.ComputePlan)
    cancel_compute_plan = _Method(ops.cancel_compute_plan)
    get_compute_plan_graph = _Method(ops.get_compute_plan_graph)
    get_compute_plan_performances = _Method(ops.get_compute_plan_performances)
    wait_compute_plan = _Method(ops.wait_compute_plan)
    # tasks
    iter_tasks = _Iterator(ops.iter_tasks, m.Task)
    get_task = _Method(ops.get_task)
    task_action = _Method(ops.task_action)
    renew_lease = _Method(ops.renew_lease)
    release_lease = _Method(ops.release_lease)
    start_task = _Method(ops.start_task)
    done_task = _Method(ops.done_task)
    fail_task = _Method(ops.fail_task)
    cancel_task = _Method(ops.cancel_task)
    register_model_output = _Method(ops.register_model_output)
    register_performance_output = _Method(ops.register_performance_output)
    register_dataset_output = _Method(ops.register_dataset_output)
    append_logs = _Method(ops.append_logs)
    read_logs = _Method(ops.read_logs)
    read_log_bytes = _Method(ops.read_log_bytes)
    follow_logs = _Iterator(ops.follow_logs, str)
    wait_task = _Method(ops.wait_task)
    get_failure_report = _Method(ops.get_failure_report)
    download_failure_logs = _Method(ops.download_failure_logs)
    # models
    iter_models = _Iterator(ops.iter_models, m.Model)
    get_model = _Method(ops.get_model)
    download_model = _Method(ops.download_model)
    # the ledger
    iter_events = _Iterator(ops.iter_events, m.LedgerEvent)
    iter_org_events = _Iterator(ops.iter_org_events, m.LedgerEvent)
    verify_ledger = _Method(ops.verify_ledger)
    follow_events = _Iterator(ops.follow_events, m.LedgerEvent)


def _settings(
    url: str | None, token: str | None, profile: str | None, headers: dict[str, str] | None
) -> tuple[str, dict[str, str]]:
    """Base URL and headers, from the arguments or else the saved profile / environment."""
    if url is None or token is None:
        saved = profiles.resolve(profile)
        url, token = url or saved.url, token or saved.token
    return url.rstrip("/"), {"Authorization": f"Bearer {token}", **(headers or {})}


def _stream_timeout(timeout: float | httpx.Timeout) -> httpx.Timeout:
    """The client's timeouts, but reads may wait for the next event of a stream longer."""
    base = timeout.as_dict() if isinstance(timeout, httpx.Timeout) else dict.fromkeys(
        ("connect", "read", "write", "pool"), timeout)
    return httpx.Timeout(**(base | {"read": STREAM_READ_TIMEOUT}))


def _unexpected(instruction: Instruction) -> ConsortError:
    return ConsortError(f"operation yielded {instruction!r} outside a stream or iterator")


class Client(_Api):
    """The blocking client. Without `url`/`token`, the saved profile (or CONSORT_URL and
    CONSORT_TOKEN) is used. `timeout` (seconds, or an `httpx.Timeout`), `limits` and
    `transport` are passed to httpx (tests, proxies)."""

    def __init__(
        self, url: str | None = None, token: str | None = None, *, profile: str | None = None,
        timeout: float | httpx.Timeout = 30.0, retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None, headers: dict[str, str] | None = None,
        limits: httpx.Limits = DEFAULT_LIMITS,
    ) -> None:
        base_url, all_headers = _settings(url, token, profile, headers)
        self.url = base_url
        self.retry = retry or RetryPolicy()
        self._timeout = timeout
        self._http = httpx.Client(base_url=base_url, headers=all_headers, timeout=timeout,
                                  transport=transport, limits=limits)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    # --- binding -------------------------------------------------------------------------

    def _method(self, factory: Callable[P, Op[T]]) -> Callable[P, T]:
        @functools.wraps(factory)
        def method(*args: P.args, **kwargs: P.kwargs) -> T:
            for out in self._drive(factory(*args, **kwargs)):
                if isinstance(out, _Done):
                    return out.value  # type: ignore[no-any-return]
                raise _unexpected(Emit(out))
            raise AssertionError("unreachable")

        return method

    def _iterator(self, factory: Callable[P, Op[None]]) -> Callable[P, Iterator[Any]]:
        @functools.wraps(factory)
        def iterate(*args: P.args, **kwargs: P.kwargs) -> Iterator[Any]:
            for out in self._drive(factory(*args, **kwargs)):
                if not isinstance(out, _Done):
                    yield out

        return iterate

    # --- the driver ------------------------------------------------------------------------

    def _drive(self, op: Op[Any]) -> Generator[Any, None, None]:
        stream: httpx.Response | None = None
        lines: Iterator[str] | None = None
        value: Any = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    instruction = drive_step(op, value, error)
                except StopIteration as stop:
                    yield _Done(stop.value)
                    return
                value, error = None, None
                if isinstance(instruction, Call):
                    try:
                        value = self._send(instruction)
                    except ConsortError as exc:
                        error = exc
                elif isinstance(instruction, Emit):
                    yield instruction.value
                elif isinstance(instruction, Sleep):
                    time.sleep(instruction.seconds)
                elif isinstance(instruction, OpenStream):
                    if stream is not None:
                        stream.close()
                    stream, lines = None, None
                    try:
                        stream = self._send(instruction.call, stream=True)
                        lines = stream.iter_lines()
                    except ConsortError as exc:
                        error = exc
                elif instruction is NEXT_LINE:
                    value = self._next_line(lines)
                elif instruction is CLOSE_STREAM and stream is not None:
                    stream.close()
                    stream, lines = None, None
        finally:
            if stream is not None:
                stream.close()
            op.close()

    @staticmethod
    def _next_line(lines: Iterator[str] | None) -> str | None:
        if lines is None:
            return None
        try:
            return next(lines, None)
        except (httpx.TransportError, httpx.StreamError):
            return None

    def _send(self, call: Call, *, stream: bool = False) -> httpx.Response:
        attempts = Attempts(self.retry, call)
        while True:
            attempts.next()
            try:
                return self._send_once(call, attempts.retried, stream)
            except (httpx.TransportError, Retry) as exc:
                delay = attempts.delay_after(exc)  # raises when it is not worth retrying
            time.sleep(delay)

    def _send_once(self, call: Call, retried: bool, stream: bool) -> httpx.Response:
        kwargs = request_kwargs(call)
        if call.upload is not None:
            kwargs["content"] = call.upload.chunks()
        timeout = _stream_timeout(self._timeout) if stream else httpx.USE_CLIENT_DEFAULT
        request = self._http.build_request(call.method, call.path, timeout=timeout, **kwargs)
        response = self._http.send(request, stream=stream or call.download is not None)
        try:
            if (stream or call.download is not None) and not response.is_success:
                response.read()
            check(call, response, retried)
            if call.download is not None:
                target = DownloadFile(call, response)
                ok = False
                try:
                    for chunk in response.iter_bytes():
                        target.write(chunk)
                    ok = True
                finally:
                    target.finish(ok)
        except BaseException:
            response.close()
            raise
        if call.download is not None:
            response.close()
        return response


class AsyncClient(_Api):
    """The asyncio client: the same methods as `Client`, as coroutines and async
    iterators. Use `async with AsyncClient(...) as client:`."""

    def __init__(
        self, url: str | None = None, token: str | None = None, *, profile: str | None = None,
        timeout: float | httpx.Timeout = 30.0, retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: dict[str, str] | None = None, limits: httpx.Limits = DEFAULT_LIMITS,
    ) -> None:
        base_url, all_headers = _settings(url, token, profile, headers)
        self.url = base_url
        self.retry = retry or RetryPolicy()
        self._timeout = timeout
        self._http = httpx.AsyncClient(base_url=base_url, headers=all_headers,
                                       timeout=timeout, transport=transport, limits=limits)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, *exc: type[BaseException] | BaseException | TracebackType | None
    ) -> None:
        await self.aclose()

    # --- binding -------------------------------------------------------------------------

    def _method(self, factory: Callable[P, Op[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        @functools.wraps(factory)
        async def method(*args: P.args, **kwargs: P.kwargs) -> T:
            driven = self._drive(factory(*args, **kwargs))
            try:
                async for out in driven:
                    if isinstance(out, _Done):
                        return out.value  # type: ignore[no-any-return]
                    raise _unexpected(Emit(out))
            finally:
                await driven.aclose()
            raise AssertionError("unreachable")

        return method

    def _iterator(self, factory: Callable[P, Op[None]]) -> Callable[P, AsyncIterator[Any]]:
        @functools.wraps(factory)
        async def iterate(*args: P.args, **kwargs: P.kwargs) -> AsyncIterator[Any]:
            driven = self._drive(factory(*args, **kwargs))
            try:
                async for out in driven:
                    if not isinstance(out, _Done):
                        yield out
            finally:
                await driven.aclose()

        return iterate

    # --- the driver ------------------------------------------------------------------------

    async def _drive(self, op: Op[Any]) -> AsyncGenerator[Any, None]:
        stream: httpx.Response | None = None
        lines: AsyncIterator[str] | None = None
        value: Any = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    instruction = drive_step(op, value, error)
                except StopIteration as stop:
                    yield _Done(stop.value)
                    return
                value, error = None, None
                if isinstance(instruction, Call):
                    try:
                        value = await self._send(instruction)
                    except ConsortError as exc:
                        error = exc
                elif isinstance(instruction, Emit):
                    yield instruction.value
                elif isinstance(instruction, Sleep):
                    await asyncio.sleep(instruction.seconds)
                elif isinstance(instruction, OpenStream):
                    if stream is not None:
                        await stream.aclose()
                    stream, lines = None, None
                    try:
                        stream = await self._send(instruction.call, stream=True)
                        lines = stream.aiter_lines()
                    except ConsortError as exc:
                        error = exc
                elif instruction is NEXT_LINE:
                    value = await self._next_line(lines)
                elif instruction is CLOSE_STREAM and stream is not None:
                    await stream.aclose()
                    stream, lines = None, None
        finally:
            if stream is not None:
                await stream.aclose()
            op.close()

    @staticmethod
    async def _next_line(lines: AsyncIterator[str] | None) -> str | None:
        if lines is None:
            return None
        try:
            return await anext(lines, None)
        except (httpx.TransportError, httpx.StreamError):
            return None

    async def _send(self, call: Call, *, stream: bool = False) -> httpx.Response:
        attempts = Attempts(self.retry, call)
        while True:
            attempts.next()
            try:
                return await self._send_once(call, attempts.retried, stream)
            except (httpx.TransportError, Retry) as exc:
                delay = attempts.delay_after(exc)  # raises when it is not worth retrying
            await asyncio.sleep(delay)

    async def _send_once(self, call: Call, retried: bool, stream: bool) -> httpx.Response:
        kwargs = request_kwargs(call)
        if call.upload is not None:
            kwargs["content"] = _async_chunks(call.upload.chunks())
        timeout = _stream_timeout(self._timeout) if stream else httpx.USE_CLIENT_DEFAULT
        request = self._http.build_request(call.method, call.path, timeout=timeout, **kwargs)
        response = await self._http.send(request, stream=stream or call.download is not None)
        try:
            if (stream or call.download is not None) and not response.is_success:
                await response.aread()
            check(call, response, retried)
            if call.download is not None:
                target = DownloadFile(call, response)
                ok = False
                try:
                    async for chunk in response.aiter_bytes():
                        target.write(chunk)
                    ok = True
                finally:
                    target.finish(ok)
        except BaseException:
            await response.aclose()
            raise
        if call.download is not None:
            await response.aclose()
        return response


async def _async_chunks(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """A file read in a worker thread, chunk by chunk, so the event loop never blocks."""
    end = object()
    while (chunk := await asyncio.to_thread(next, chunks, end)) is not end:
        assert isinstance(chunk, bytes)
        yield chunk
