"""llama.cpp's RPC backend, reached through the ggml libraries llama-cpp-python ships.

Two sides of one protocol (``ggml-rpc``, the same one llama.cpp's ``rpc-server`` and
``llama-server --rpc`` speak):

* ``connect()`` runs in a model's worker before it loads: each endpoint becomes a ggml device,
  and llama.cpp then places layers on it exactly as ``--rpc`` does (RPC devices first,
  ``n_gpu_layers`` and ``tensor_split`` as usual).
* ``serve()`` runs in ``rpc_worker.py`` on the box that lends its CPU or GPU; it never returns.

Why a handshake of our own before ggml's: ggml's client connects without a timeout and aborts
the whole process when the connection or its handshake fails. Checked here first, with a bound
on every step, an unreachable endpoint, something that is not an RPC server, a version
mismatch, or a server busy with another client (it serves one at a time) becomes a load error
naming the endpoint. A server that vanishes later, mid-generation, still aborts the worker:
the engine's crash handling turns that into errors on that model's requests only.

Concurrency model: none; called from the worker's (or rpc_worker's) only thread. ggml's
registry is process-wide, which is fine because a worker process holds one model for life.
"""

from __future__ import annotations

import ctypes
import re
import socket
import struct
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

HELLO = 14  # RPC_CMD_HELLO, fixed across protocol versions
PROTOCOL_MAJOR = 7  # RPC_PROTO_MAJOR_VERSION of the ggml we ship
PROTOCOL_MINOR = 0
CAPS_SIZE = 24  # rpc_msg_hello_req: transport capabilities; all zero means plain TCP
HELLO_REPLY_SIZE = 4 + CAPS_SIZE  # major, minor, patch, padding, then the server's capabilities
DEVICE_TYPE_CPU, DEVICE_TYPE_GPU, DEVICE_TYPE_IGPU = 0, 1, 2  # enum ggml_backend_dev_type
MAX_SERVERS = 16  # GGML_RPC_MAX_SERVERS


class RpcError(RuntimeError):
    """An RPC endpoint cannot be used; the message names it and says why."""


@dataclass(frozen=True)
class Device:
    """A ggml device as llama.cpp names it (``RPC0``...), where it is, and its memory."""

    name: str
    description: str
    free: int
    total: int


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` as ggml reads it (split at the first colon, so no IPv6 literals)."""
    host, sep, port = endpoint.partition(":")
    # ASCII only: ggml reads the port with stoi (no other digits) and resolves the host as bytes.
    plain_host = host.isascii() and host.isprintable() and " " not in host
    if not sep or not plain_host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"{endpoint!r} is not host:port (a host name or IPv4 address, and a port 1-65535)")
    return host, int(port)


def probe(endpoint: str, timeout: float) -> None:
    """Connect and say hello as ggml's client would; raise ``RpcError`` naming what went wrong."""
    host, port = parse_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            conn.sendall(struct.pack("<BQ", HELLO, CAPS_SIZE) + bytes(CAPS_SIZE))
            reply = _receive(conn, 8 + HELLO_REPLY_SIZE)
    except TimeoutError:
        raise RpcError(f"RPC server {endpoint} did not answer within {timeout:g} s (busy with another "
                       "client? an rpc_worker serves one model at a time)") from None
    except OSError as exc:
        raise RpcError(f"RPC server {endpoint} is unreachable: {exc.strerror or exc}") from None
    except UnicodeError:  # Python's resolver refuses the name (a label over 63 characters, an empty one)
        raise RpcError(f"RPC server {endpoint} is unreachable: {host!r} is not a valid host name") from None
    size, major, minor = struct.unpack_from("<QBB", reply)
    if size != HELLO_REPLY_SIZE:
        raise RpcError(f"{endpoint} answered, but not as a ggml RPC server of protocol {PROTOCOL_MAJOR}.x")
    if major != PROTOCOL_MAJOR or minor > PROTOCOL_MINOR:
        raise RpcError(f"RPC server {endpoint} speaks protocol {major}.{minor}; this build speaks "
                       f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}: run the same llama.cpp version on both sides")


def _receive(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("closed the connection during the handshake")
        data += chunk
    return data


def connect(endpoints: list[str] | tuple[str, ...], timeout: float) -> list[Device]:
    """Probe every endpoint, then register each as ggml devices; return the devices added."""
    for endpoint in endpoints:
        probe(endpoint, timeout)
    lib = _ggml()
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(_proc(lib, "ggml_backend_rpc_add_server"))
    devices = []
    for endpoint in endpoints:
        reg = add_server(endpoint.encode())
        if not reg:
            raise RpcError(f"RPC server {endpoint} offers no devices")
        lib.ggml_backend_register(reg)
        devices += [_device(lib, lib.ggml_backend_reg_dev_get(reg, i))
                    for i in range(lib.ggml_backend_reg_dev_count(reg))]
    return devices


def serve(endpoint: str, cache_dir: str | None, n_threads: int) -> None:
    """Serve this machine's accelerators (or, without any, its CPU) on ``endpoint``; never returns."""
    parse_endpoint(endpoint)
    lib = _ggml()
    chosen = local_devices(lib)
    array = (ctypes.c_void_p * len(chosen))(*chosen)
    start = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                             ctypes.c_void_p)(_proc(lib, "ggml_backend_rpc_start_server"))
    start(endpoint.encode(), cache_dir.encode() if cache_dir else None, n_threads, len(chosen), array)
    raise RpcError(f"the RPC server on {endpoint} stopped (is the port in use?)")


def local_devices(lib: ctypes.CDLL | None = None) -> list[int]:
    """Every GPU ggml sees here, or the CPU when there is none (llama.cpp's rpc-server's rule)."""
    lib = lib or _ggml()
    gpus = [dev for dev in (lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count()))
            if lib.ggml_backend_dev_type(dev) == DEVICE_TYPE_GPU and not _is_rpc(lib, dev)]
    return gpus or [lib.ggml_backend_dev_by_type(DEVICE_TYPE_CPU)]


def local_gpu(lib: ctypes.CDLL | None = None) -> int | None:
    """The device mtmd would pick for a projector, RPC devices left out (ggml counts them as GPUs):
    the first GPU here, else the first integrated one; None for none (the CPU)."""
    lib = lib or _ggml()
    devices = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]
    for wanted in (DEVICE_TYPE_GPU, DEVICE_TYPE_IGPU):
        for dev in devices:
            if lib.ggml_backend_dev_type(dev) == wanted and not _is_rpc(lib, dev):
                return dev
    return None


def describe(dev: int) -> Device:
    """Name, description and memory of a device handle from ``local_devices``."""
    return _device(_ggml(), dev)


def supported() -> bool:
    """Whether the installed llama.cpp was built with the RPC backend (-DGGML_RPC=on)."""
    return bool(_ggml().ggml_backend_reg_by_name(b"RPC"))


def _is_rpc(lib: ctypes.CDLL, dev: int) -> bool:
    return lib.ggml_backend_dev_name(dev).startswith(b"RPC")


def _device(lib: ctypes.CDLL, dev: int) -> Device:
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return Device(lib.ggml_backend_dev_name(dev).decode(errors="replace"),
                  lib.ggml_backend_dev_description(dev).decode(errors="replace"), free.value, total.value)


def _proc(lib: ctypes.CDLL, name: str) -> int:
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise RpcError("this llama-cpp-python was built without the RPC backend: rebuild it with "
                       "scripts/setup-venv.sh (it adds -DGGML_RPC=on)")
    address = lib.ggml_backend_reg_get_proc_address(reg, name.encode())
    if not address:
        raise RpcError(f"the RPC backend has no {name}")
    return address


def _loaded_ggml_path() -> str:
    """The file of libggml that libllama itself linked.

    It must be that very file: llama-cpp-python's wheel ships ``libggml.so``, ``libggml.so.0``
    and ``libggml.so.0.x`` as separate copies, not links, and opening another copy would give a
    second, private device registry that llama.cpp never looks at.
    """
    import llama_cpp  # loading it loads libllama and, with it, libggml and its backends

    maps = Path("/proc/self/maps")
    if maps.exists():
        for line in maps.read_text().splitlines():
            path = line.split(maxsplit=5)[-1]
            if re.search(r"/libggml\.so(\.\d+)*$", path):
                return path
    folder = Path(llama_cpp.__file__).parent / "lib"
    names = {"darwin": ["libggml.0.dylib", "libggml.dylib"], "win32": ["ggml.dll"]}.get(sys.platform, ["libggml.so"])
    return str(next((folder / name for name in names if (folder / name).exists()), folder / names[-1]))


@cache
def _ggml() -> ctypes.CDLL:
    """libggml as libllama uses it (dlopen of a loaded file returns the same handle)."""
    lib = ctypes.CDLL(_loaded_ggml_path())
    pointer, size, text = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
    for name, args, result in (
        ("ggml_backend_reg_by_name", [text], pointer),
        ("ggml_backend_reg_get_proc_address", [pointer, text], pointer),
        ("ggml_backend_register", [pointer], None),
        ("ggml_backend_reg_dev_count", [pointer], size),
        ("ggml_backend_reg_dev_get", [pointer, size], pointer),
        ("ggml_backend_dev_count", [], size),
        ("ggml_backend_dev_get", [size], pointer),
        ("ggml_backend_dev_by_type", [ctypes.c_int], pointer),
        ("ggml_backend_dev_type", [pointer], ctypes.c_int),
        ("ggml_backend_dev_name", [pointer], text),
        ("ggml_backend_dev_description", [pointer], text),
        ("ggml_backend_dev_memory", [pointer, ctypes.POINTER(size), ctypes.POINTER(size)], None),
    ):
        function = getattr(lib, name)
        function.argtypes, function.restype = args, result
    return lib
