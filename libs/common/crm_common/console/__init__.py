"""The ops console: static pages over the five services' APIs, behind a same-origin proxy.

`python -m crm_common.console [--port 8000]` (started by `make run`). The pages are plain HTML,
CSS and JavaScript with SVG charts (no build step, nothing but this process at run time); the
browser asks `/api/<service>/<path>`, which this process forwards to the service with the
user's `Authorization` header, so the console holds no key of its own and every scope rule of
the ops keys (`write`, `pii`) applies to what the user sees and does.
"""
