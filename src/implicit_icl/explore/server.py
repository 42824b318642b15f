"""The explorer's web server: `create_app(loaded)` (FastAPI) and `serve` (uvicorn on 127.0.0.1 by default).

Routes: GET / (the page, static/index.html), GET /static/* (its script and style, no network needed),
GET /api/info (the model, its layers, the compilable tasks), GET /api/status (busy or not, the running step),
POST /api/dynamics, /api/patch, /api/compile (explore/api.py). Every error is a 4xx (5xx for a bug) with
one line: {"error": "..."}; a request while another computation runs gets 409.
"""

from __future__ import annotations

import socket
import sys
import threading
import webbrowser
from pathlib import Path
from typing import Any

from implicit_icl.errors import ImplicitICLError
from implicit_icl.explore.api import Busy, Explorer
from implicit_icl.models.load import LoadedModel

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def create_app(loaded: LoadedModel):
    """The FastAPI app over one loaded model (see the module docstring)."""
    from fastapi import Body, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles

    explorer = Explorer(loaded)
    app = FastAPI(title="implicit-icl explore", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.explorer = explorer
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": " ".join(message.split())}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError):
        problems = exc.errors()
        detail = problems[0].get("msg", "malformed request") if problems else "malformed request"
        return error(400, f"the request body must be a JSON object: {detail}")

    @app.exception_handler(Busy)
    async def busy(request: Request, exc: Busy):
        return error(409, str(exc))

    @app.exception_handler(ImplicitICLError)
    async def bad_input(request: Request, exc: ImplicitICLError):
        return error(400, str(exc))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        return error(500, f"internal error ({type(exc).__name__}): {exc}")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    def no_icon():
        return Response(status_code=204)

    @app.get("/api/info")
    def info():
        return explorer.info()

    @app.get("/api/status")
    def status():
        return explorer.status()

    # Plain (non-async) handlers run in a thread pool, so /api/status answers while a computation runs.
    @app.post("/api/dynamics")
    def dynamics(payload: Any = Body(...)):
        return explorer.run("dynamics", payload)

    @app.post("/api/patch")
    def patch(payload: Any = Body(...)):
        return explorer.run("patch", payload)

    @app.post("/api/compile")
    def compile_(payload: Any = Body(...)):
        return explorer.run("compile", payload)

    return app


def bound_socket(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one), or a one-line error."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as error:
        raise ImplicitICLError(f"cannot listen on {host}:{port} ({error.strerror}); pass another --port") from None
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/"


def uvicorn_server(app):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))


def serve(loaded: LoadedModel, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, open_browser: bool = True) -> str:
    """Serve the explorer until Ctrl-C (uvicorn stops cleanly on SIGINT/SIGTERM); prints and returns its URL."""
    sock = bound_socket(host, port)
    url = url_of(sock)
    sys.stdout.write(f"implicit-icl explore: {loaded.name} at {url} (Ctrl-C stops it)\n")
    sys.stdout.flush()
    if open_browser:
        threading.Timer(0.5, webbrowser.open, [url]).start()
    try:
        uvicorn_server(create_app(loaded)).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn has shut down and re-raises the Ctrl-C it caught
        pass
    finally:
        sock.close()
    sys.stdout.write("implicit-icl explore: stopped\n")
    return url


class BackgroundServer:
    """The explorer on a real uvicorn server in a thread (for tests and notebooks): `with BackgroundServer(loaded)
    as url:` serves on 127.0.0.1 and a free port, and stops on exit."""

    def __init__(self, loaded: LoadedModel, host: str = DEFAULT_HOST, port: int = 0):
        self.app = create_app(loaded)
        self.sock = bound_socket(host, port)
        self.url = url_of(self.sock)
        self.server = uvicorn_server(self.app)
        self.thread = threading.Thread(target=self.server.run, kwargs=dict(sockets=[self.sock]), daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            threading.Event().wait(0.02)
        if not self.server.started:
            raise ImplicitICLError(f"the explorer's server did not start on {self.url}")
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
