"""The local web app (``python -m app``): chat and structured extraction over one shared model.

Its rooms, data flowing one way (page → runtime → ``lfm_mlx``): ``runtime`` (the model, its engine and
the stream of one request), ``sessions`` (each browser tab's or API client's conversation), ``inputs``
(what the handlers accept, refused in one line), ``chat_tab``, ``extract_tab`` and ``model_tab`` (each
tab's layout and handlers), ``endpoints`` (the API for scripts) and ``ui`` (the page that holds them).
``__main__`` starts it, with the OpenAI-compatible routes under /v1.
"""
