"""``python -m vspemu.console --data-dir D --host H --port P``: the lab console (started by ``vspemu up``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import uvicorn

from vspemu.certs import ensure_certificate
from vspemu.console.app import Console, build_app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m vspemu.console", description=__doc__)
    parser.add_argument("--data-dir", type=Path, required=True, help="the lab's data directory (its lab.json)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level="WARNING", format="%(asctime)s %(name)s %(levelname)s %(message)s")
    tls = args.data_dir / "console" / "tls"
    cert, key = tls / "server.crt", tls / "server.key"
    ensure_certificate(cert, key, "vspemu-lab-console", [args.host])
    app = build_app(Console.from_lab(args.data_dir))
    uvicorn.run(app, host=args.host, port=args.port, ssl_certfile=str(cert), ssl_keyfile=str(key),
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
