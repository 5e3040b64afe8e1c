"""The A/B serving proxy. Build it with `proxy.app.create_app(settings)`."""
