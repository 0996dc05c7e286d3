"""The plugin hooks of ``aha``. These docstrings are the plugin author's documentation.

A plugin is a module (or any object) that implements some of these hooks with
``@aha.hookimpl`` and is announced through the entry-point group ``aha``:

    [project.entry-points.aha]
    mybackend = "my_package.plugin"

The built-in backends are registered exactly this way.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("aha")
hookimpl = pluggy.HookimplMarker("aha")


@hookspec
def register_backends(register):
    """Register attention backends.

    Call ``register(aha.Backend(...))`` once per backend this plugin provides.
    ``Backend.forward(q, k, v, gate, *, window, scale)`` receives inputs that
    already passed validation (see ``aha.validation``) and returns ``out``
    with q's shape and dtype. ``Backend.capabilities`` says which arrays,
    devices, dtypes and features it serves; ``Backend.available`` returns
    ``None`` when it can run here, or a sentence saying why it cannot.

    Keep this hook cheap: import heavy dependencies inside ``forward`` or
    ``available``, so that a missing dependency makes the backend unavailable
    instead of breaking ``import aha``.

    Args:
        register (Callable[[Backend], None]): ``register(backend)`` adds one ``aha.Backend`` to the registry.
            Anything that is not an ``aha.Backend``, or a name already taken,
            marks the plugin broken.

    Example:
        ```python
        @aha.hookimpl
        def register_backends(register):
            register(aha.Backend(name="mine", forward=forward, priority=20))
        ```
    """
