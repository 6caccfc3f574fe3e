"""What a command works with, built on first use from the settings: the
repository, the lifecycle, a client for a running server. The model stack
(numpy, ONNX Runtime, scikit-learn) is imported only by commands that use it."""
from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from app import settings as settings_module
from app.cli import servers
from app.client import MLClient

if TYPE_CHECKING:
    from app.lifecycle import Lifecycle
    from app.publishing import Publisher
    from app.repository import ModelRepository


class Context:
    @functools.cached_property
    def settings(self) -> settings_module.Settings:
        return settings_module.load()

    @functools.cached_property
    def repository(self) -> ModelRepository:
        from app.repository import ModelRepository

        return ModelRepository(self.settings.models.directory)

    @functools.cached_property
    def lifecycle(self) -> Lifecycle:
        from app.lifecycle import Lifecycle
        from app.plan import read_plan

        plan = functools.partial(read_plan, Path(self.settings.models.config))
        return Lifecycle(self.repository, self.settings.models.verify_tolerance, plan)

    @functools.cached_property
    def publisher(self) -> Publisher:
        from app.publishing import Publisher

        return Publisher(self.lifecycle)

    def client(self, url: str | None, api_key: str | None = None) -> MLClient:
        # Only the default URL needs the settings; an explicit one works with bad settings too.
        return servers.client(url, self.settings if url is None else None, api_key)

    def admin_client(self, args) -> contextlib.AbstractContextManager[MLClient | None]:
        """A client for the server's admin API when --url (or MLSERVE_URL) names one, else None:
        the command then changes the repository itself."""
        url = args.url or self.settings.cli.url
        if not url:
            return contextlib.nullcontext(None)
        return self.client(url, args.api_key or self.settings.cli.api_key or self.settings.server.admin_token or None)

    def keys_changed(self) -> None:
        """Tell every host at once (the servers of this host re-read the keys file within a second anyway)."""
        if self.settings.redis.url:
            from app.control import ControlChannel  # the server install's redis client

            ControlChannel(self.settings.redis.url).publish({"op": "keys"})

    def changed(self, what: str) -> int:
        """Print what changed, then tell running servers."""
        print(what)
        settings = self.settings
        print(servers.notify_servers(settings.redis.url, Path(settings.pid_path), settings.models.directory, what))
        sys.stdout.flush()
        return 0
