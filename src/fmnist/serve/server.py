"""`fmnist serve`: the address checked, the model loaded and warmed up at every batch size, and
uvicorn started with the guarded protocol.

    fmnist serve --model runs/my-run                  # http://127.0.0.1:8000/
"""

import ipaddress
import logging
import os
import sys

from fmnist import FmnistError
from fmnist.inference.predictor import load_model
from fmnist.serve.app import create_app
from fmnist.serve.config import ServeConfig
from fmnist.serve.protocol import guarded_protocol

log = logging.getLogger("fmnist.serve")

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_address(host: str, port: int) -> None:
    """Refuse an address the server cannot listen on (a port in use, a host that is not this
    machine's) in one line, before the model loads and uvicorn logs its start-up."""
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise FmnistError(f"cannot serve on {host}:{port}: unknown host ({e.strerror}); "
                          "give --host an address of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    hints = {errno.EADDRINUSE: "; another program listens there: choose another --port",
             errno.EACCES: "; ports below 1024 need privileges: choose another --port",
             errno.EADDRNOTAVAIL: "; not an address of this machine: choose another --host"}
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as e:
            reason = (e.strerror or str(e)).lower()
            raise FmnistError(f"cannot serve on {host}:{port}: {reason}{hints.get(e.errno, '')}") from None


def serve(run_dir: str | os.PathLike, config: ServeConfig | None = None) -> None:
    """Load the run's model and serve it until interrupted."""
    import copy
    import dataclasses

    config = config or ServeConfig()
    try:
        import uvicorn
    except ImportError as e:
        raise FmnistError(f"serving needs the serve extra ({e.name} is missing): "
                          "pip install 'fmnist[serve]'") from None
    import torch

    if config.api_key is None and os.environ.get("FMNIST_API_KEY"):
        config = dataclasses.replace(config, api_key=os.environ["FMNIST_API_KEY"])
    config.validate()
    check_address(config.host, config.port)
    if not is_loopback(config.host) and config.api_key is None:
        print(f"fmnist: warning: serving on {config.host} without an API key: anyone who can reach "
              "this address can use the service; set FMNIST_API_KEY (or --api-key), or put an "
              "authenticating proxy in front", file=sys.stderr)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    predictor = load_model(run_dir)
    app = create_app(predictor, config)
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)  # and our own lines, as uvicorn's
    log_config["loggers"]["fmnist"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    log_config["loggers"]["python_multipart"] = {"level": "ERROR"}  # a line per malformed upload: its 400 says it
    uvicorn_config = uvicorn.Config(
        app, host=config.host, port=config.port, access_log=config.access_log, log_config=log_config,
        log_level=config.log_level, http=guarded_protocol(config), server_header=False,
    )
    server = uvicorn.Server(uvicorn_config)
    try:
        server.run()
    except (OSError, SystemExit) as e:  # uvicorn logs a taken port and exits
        if server.started:
            raise
        raise FmnistError(f"cannot serve on {config.host}:{config.port} ({e})") from None
