"""Model backends behind one interface (:class:`Backend`).

``SETTINGS_BY_KIND`` maps a config ``kind`` to its settings class; :func:`open_backend`
builds the backend for a settings object. Backends whose dependencies are heavy
(the embedded model) import them only when constructed.
"""

from __future__ import annotations

from .base import Backend, BackendSettings, Generation
from .llama_engine import EmbeddedSettings
from .ollama import OllamaSettings
from .openai_compat import OpenAISettings
from .scripted import ScriptedSettings

__all__ = [
    "SETTINGS_BY_KIND",
    "Backend",
    "BackendSettings",
    "Generation",
    "create_backend",
]

SETTINGS_BY_KIND: dict[str, type[BackendSettings]] = {
    "embedded": EmbeddedSettings,
    "openai": OpenAISettings,
    "ollama": OllamaSettings,
    "scripted": ScriptedSettings,
}


def create_backend(settings: BackendSettings) -> Backend:
    """The backend for ``settings`` (not yet entered: use ``async with``)."""
    if isinstance(settings, ScriptedSettings):
        from .scripted import ScriptedBackend

        return ScriptedBackend(settings)
    if isinstance(settings, OpenAISettings):
        from .openai_compat import OpenAIBackend

        return OpenAIBackend(settings)
    if isinstance(settings, OllamaSettings):
        from .ollama import OllamaBackend

        return OllamaBackend(settings)
    if isinstance(settings, EmbeddedSettings):
        from .embedded import EmbeddedBackend

        return EmbeddedBackend(settings)
    raise TypeError(f"no backend for {type(settings).__name__}")
