"""Starting a local Ray instance (bound to 127.0.0.1) or joining an existing cluster.

A local instance (``address="local"``) is for trying the Ray path on one
machine and for the tests: every Ray process of it binds 127.0.0.1, no
dashboard is started and usage reporting is off. Ray turns a loopback
address into the machine's routable address before connecting
(``services.resolve_ip_for_localhost``) unless its "cluster mode" is off
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when Ray is imported), so that
is switched off for loopback addresses, before and after Ray's import.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from types import ModuleType

from ultrastyle.errors import Setting, remedied
from ultrastyle.options import usable_cpus

LOOPBACK = "127.0.0.1"
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
# ray.init retries an address where nothing listens without end (measured: 10 minutes of "Failed to connect
# to GCS"): a plain TCP connect answers within this many seconds first.
PROBE_TIMEOUT_S = 10.0
# Ray 2.60 logs this at every new local instance (it turns token authentication on, which is kept): noise on each run.
_TOKEN_LOGGER, _TOKEN_NOTICE = "ray._private.authentication.authentication_token_setup", "Token authentication is enabled"


class ClusterError(RuntimeError):
    """Ray is missing, or the cluster cannot be started or reached; the message says which and why."""


def is_loopback(address: str) -> bool:
    """Whether ``address`` (``"local"``, ``host:port`` or ``ray://host:port``) stays on this machine's loopback."""
    if address == "local":
        return True
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    return host in _LOOPBACK_HOSTS


def ray_env(loopback: bool) -> None:
    """The environment every Ray start of ours gets (and the processes it spawns inherit)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # no usage reporting, ever
    if loopback:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def import_ray(loopback: bool = True) -> ModuleType:
    """``ray``, with our environment set first; ClusterError naming the extra when it is not installed."""
    ray_env(loopback)
    try:
        import ray
    except ImportError as exc:
        raise ClusterError(f"Ray is not installed ({exc}); install the extra: pip install 'ultrastyle[ray]'") from None
    if loopback:  # ray may have been imported before our environment was set
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    return ray


def probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """ClusterError unless something accepts a TCP connection at ``host:port`` (``ray://host:port``); others pass.

    ``"local"`` and ``"auto"`` (Ray finds the address itself) are not probed.
    """
    if address in ("local", "auto"):
        return
    client = address.startswith("ray://")
    host, sep, port_text = address.split("://", 1)[-1].rpartition(":")
    if (":" in host and not host.startswith("[")) or (client and not (sep and port_text.isdigit())):
        return  # a bare IPv6 address, a client address without a port: Ray's own parsing says what is wrong
    if not sep or not host or not port_text.isdigit():  # Ray said "ValueError: Invalid address format: foo"
        raise ClusterError(f"{address!r} is not a Ray address: expected 'local' (Ray on this machine), 'auto' (the cluster this "
                           "machine joined), HOST:PORT (a head's GCS port, e.g. 10.0.0.5:6379) or ray://HOST:PORT (its client server)")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: port {port} is out of range (1..65535)")
    try:
        addr = _lookup(host.strip("[]"), port, timeout)
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {host} does not resolve ({exc.strerror or exc})") from None
    try:
        with socket.create_connection(addr, timeout=timeout):
            pass
    except OSError as exc:
        start = "its head's Ray client server" if client else f"one there (ray start --head --port {port})"
        raise remedied(ClusterError(
            f"cannot reach the Ray cluster at {address}: nothing answers on port {port} of {host} ({exc.strerror or exc}); "
            f"start {start} or use address='local'"
        ), Setting("address", "local")) from None


def _lookup(host: str, port: int, timeout: float) -> tuple[str, int]:
    """``host``'s first TCP address within ``timeout`` seconds (getaddrinfo itself has no timeout); OSError otherwise."""
    found: list = []

    def resolve() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][:2])
        except OSError as exc:
            found.append(exc)

    t = threading.Thread(target=resolve, daemon=True)  # left to finish on its own if the resolver hangs
    t.start()
    t.join(timeout)
    if not found:
        raise OSError(f"no answer from the name resolver for {host} within {timeout:g} s")
    if isinstance(found[0], OSError):
        raise found[0]
    return found[0]


def connect(address: str = "local", *, num_cpus: int | None = None) -> bool:
    """Start (``"local"``) or join (``host:port``, ``ray://...``, ``"auto"``) Ray; True when this call did.

    A process already connected (``ray.is_initialized()``) is left as it is and
    False returned, so the caller knows not to shut it down. ``num_cpus``: of a
    local instance (default: every core).
    """
    loopback = is_loopback(address)
    ray = import_ray(loopback)
    if ray.is_initialized():
        return False
    probe(address)
    kwargs: dict = dict(logging_level=logging.WARNING, log_to_driver=False, configure_logging=True)
    handlers = _signal_handlers()
    # Blocked while Ray starts: the processes it spawns inherit the mask, so a terminal's Ctrl-C or a scheduler's SIGTERM
    # to the whole process group reaches this driver alone, which reports and shuts them down (they died first, and
    # the driver hung a minute on a dead GCS); a Ctrl-C during the start is delivered once it is over, not lost.
    blocked = _block_stop_signals()
    quiet = logging.getLogger(_TOKEN_LOGGER)

    def notice(record: logging.LogRecord) -> bool:  # a logging filter (any callable is one)
        return not record.getMessage().startswith(_TOKEN_NOTICE)

    try:
        if address == "local":
            quiet.addFilter(notice)
            ray.init(
                address="local", _node_ip_address=LOOPBACK, include_dashboard=False,
                num_cpus=num_cpus or usable_cpus(), **kwargs,
            )  # fmt: skip
        else:
            ray.init(address=address, _node_ip_address=LOOPBACK if loopback else None, **kwargs)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError ...
        where = "a local Ray instance" if address == "local" else f"the Ray cluster at {address}"
        hint = ""
        token = Path.home() / ".ray" / "auth_token"
        if address != "local" and token.is_file() and "RAY_AUTH_MODE" not in os.environ:  # measured: Ray 2.60's heads
            hint = (f"; {token} exists, so a head started here uses token authentication, which a driver joins only with "
                    "RAY_AUTH_MODE=token set")  # fmt: skip
        raise ClusterError(f"cannot start or reach {where}: {type(exc).__name__}: {exc}{hint}") from None
    finally:
        quiet.removeFilter(notice)
        _restore(handlers)
        _unblock(blocked)
    return True


def _signal_handlers() -> dict[int, object]:
    """The process's SIGINT/SIGTERM handlers (main thread only): ray.init installs its own, which end the process
    without the caller's clean-up (SIGTERM: its C++ stack dump, then an abort)."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}


def _block_stop_signals() -> set[int]:
    """Block SIGINT and SIGTERM in this thread (the main one; elsewhere nothing); the signals it blocked."""
    import signal

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        return set()
    stop = {signal.SIGINT, signal.SIGTERM}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    return stop - set(before)


def _unblock(blocked: set[int]) -> None:
    import signal

    if blocked:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)


def _restore(handlers: dict[int, object]) -> None:
    import signal

    for signum, handler in handlers.items():
        if handler is not None:
            signal.signal(signum, handler)  # type: ignore[arg-type]


def disconnect() -> None:
    """``ray.shutdown()`` (stops a local instance this process started)."""
    import ray

    ray.shutdown()
