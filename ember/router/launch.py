"""`ember router`: serves the router app with uvicorn until SIGTERM or Ctrl-C."""

from __future__ import annotations

import uvicorn

from ember.config import RouterConfig


def run_router(config: RouterConfig) -> int:
    from ember.router.app import build_router_app

    config.validate()
    app = build_router_app(config)
    print(f"ember router at http://{config.host}:{config.port}/v1 in front of "
          f"{len(config.workers)} worker(s); register more with "
          f"POST /workers {{\"url\": ...}}", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, loop="auto", http="auto",
                access_log=False, log_level="info")
    return 0
