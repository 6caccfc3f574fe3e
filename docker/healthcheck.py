"""The image's HEALTHCHECK: exit 0 when this container's server answers 200 on
/ready, 1 otherwise. The address comes from the server's own settings
(MLSERVE_BIND, MLSERVE_SERVER_PORT, config/server.yaml), so it is the one
Gunicorn listens on; the request itself uses nothing but the standard library."""
from __future__ import annotations

import http.client
import sys

from app import settings

WILDCARDS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def main() -> int:
    try:
        server = settings.load().server
    except settings.SettingError as exc:
        print(f"unhealthy: bad setting: {exc}")
        return 1
    host = WILDCARDS.get(server.host, server.host)
    connection = http.client.HTTPConnection(host, server.port, timeout=4)
    try:
        connection.request("GET", "/ready")
        response = connection.getresponse()
        body = response.read(500).decode(errors="replace")
    except OSError as exc:
        print(f"unhealthy: {host}:{server.port}: {exc}")
        return 1
    finally:
        connection.close()
    if response.status != 200:
        print(f"unhealthy: /ready answered {response.status}: {body}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
