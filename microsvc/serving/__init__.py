"""What runs the server: the `Launcher` that embeds gunicorn (`launcher`), microsvc's
arbiter (`arbiter`), loading the application (`appload`), binding sockets (`binding`),
gevent/eventlet monkey-patching (`patching`), the WSGI middleware for proxies,
request ids and health (`middleware`), and the typed way from a worker or the arbiter to
the Launcher's settings (`context`)."""
