"""service: the application layer that joins ``mm`` (the model) and ``index`` (collections).

It holds the FastAPI app (``service.app.create_app``), the ``mm`` command line (``service.cli.main``)
and the functions both share (``service.search``, ``service.store``). Nothing is loaded at import time.
"""
