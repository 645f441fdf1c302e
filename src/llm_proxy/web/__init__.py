"""HTTP surface: routes, middleware, SSE writing. The only package (with app.py) that knows aiohttp."""
