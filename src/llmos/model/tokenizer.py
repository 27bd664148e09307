"""Text <-> token ids: loads a Hugging Face `tokenizer.json`, renders chat templates in a jinja2 sandbox,
and detokenizes a token stream incrementally. All BPE work is done by the `tokenizers` library; this
module never implements a tokenization algorithm itself and imports nothing from llmos but `llmos.errors`.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from llmos.errors import InvalidRequestError, ModelLoadError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
REPLACEMENT_CHAR = "\ufffd"  # what a decoder emits for bytes that are not (yet) valid UTF-8


class Tokenizer:
    """A Hugging Face fast tokenizer plus the special tokens and chat template of one model.

    Encoding and decoding match `transformers.AutoTokenizer.from_pretrained(dir)` for the same
    directory (a `PreTrainedTokenizerFast`): the post-processor in `tokenizer.json` alone decides which
    special tokens `encode` adds (transformers 5 ignores `add_bos_token` there too), and
    `clean_up_tokenization_spaces` is not applied (transformers skips it for BPE).
    """

    def __init__(self, backend: HFTokenizer, config: dict | None = None, generation_config: dict | None = None):
        self._backend = backend
        self._config = dict(config or {})
        self.special_tokens = {key: _token_content(self._config.get(key)) for key in SPECIAL_TOKEN_KEYS}
        self._register_special_tokens()
        self.chat_template = _pick_chat_template(self._config.get("chat_template"))
        self.eos_token_ids = self._collect_eos_ids(generation_config or {})

    # ---- loading and saving ------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json`, `tokenizer_config.json`, and (if present) `chat_template.jinja` and
        `generation_config.json` from a model directory.

        Raises `ModelLoadError` naming the file when the directory or `tokenizer.json` is missing, or a
        file is not valid JSON / not a tokenizer.
        """
        path = Path(path)
        tokenizer_file = path / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise ModelLoadError(
                f"{tokenizer_file} not found: llmos needs the Hugging Face fast tokenizer file. Copy "
                f"{TOKENIZER_FILE} from the model's repository into {path}, or convert a slow tokenizer with "
                f"`transformers.AutoTokenizer.from_pretrained(dir).save_pretrained(dir)`."
            )
        try:
            backend = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # the Rust library raises a bare Exception for bad JSON or schema
            raise ModelLoadError(
                f"{tokenizer_file} is corrupt or not a tokenizer ({err}); download it again from the "
                f"model's repository."
            ) from err
        config = _read_json(path / CONFIG_FILE)
        template_file = path / CHAT_TEMPLATE_FILE
        if template_file.is_file():  # transformers lets this file override the config's template
            config["chat_template"] = template_file.read_text(encoding="utf-8")
        return cls(backend, config, _read_json(path / GENERATION_CONFIG_FILE))

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` (with the chat template) into `path`.

        `generation_config.json` belongs to the model and is not written here.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(path / TOKENIZER_FILE))
        config = dict(self._config)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.update({key: value for key, value in self.special_tokens.items() if value is not None})
        if _pick_chat_template(config.get("chat_template")) != self.chat_template:  # keeps a list of templates
            config["chat_template"] = self.chat_template
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    # ---- ids and text ------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens` the post-processor adds e.g. BOS.
        Raises `InvalidRequestError` for text that is not valid Unicode (lone surrogates)."""
        try:
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            if isinstance(text, str):
                raise InvalidRequestError("the text is not valid UTF-8 (it holds a lone surrogate such as "
                                          "\\ud800); send valid Unicode text.") from None
            raise

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text, the same as `encode` on each, tokenized in parallel by the Rust library."""
        encodings = self._backend.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]

    @property
    def backend(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (e.g. to serialize it with `to_str()`)."""
        return self._backend

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; incomplete UTF-8 byte sequences decode to U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added and special tokens included (`len(hf_tokenizer)`)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id("pad_token")

    def _token_id(self, key: str) -> int | None:
        content = self.special_tokens[key]
        return None if content is None else self._backend.token_to_id(content)

    # ---- chat templates ----------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) into the prompt text.

        The model's template runs in `ImmutableSandboxedEnvironment` with the globals transformers gives
        it, so the text equals `transformers`' `apply_chat_template(..., tokenize=False)`. Without a
        template, the fallback is one "Role: content" line per message, then "Assistant:" when
        `add_generation_prompt`. Raises `InvalidRequestError` for malformed messages, a template that
        fails to compile or render, calls `raise_exception`, or breaks the sandbox.
        """
        messages = _normalize_messages(messages)
        if self.chat_template is None:
            return _plain_chat(messages, add_generation_prompt)
        specials = {key: value for key, value in self.special_tokens.items() if value is not None}
        return render_chat_template(
            self.chat_template, messages=messages, add_generation_prompt=add_generation_prompt, **specials
        )

    # ---- setup helpers -------------------------------------------------------------------------

    def _register_special_tokens(self) -> None:
        """Add configured special tokens the backend does not know as added tokens (as transformers does)."""
        known = {token.content for token in self._backend.get_added_tokens_decoder().values()}
        missing = []
        added = self._config.get("added_tokens_decoder") or {}
        for _, entry in sorted(added.items(), key=lambda item: int(item[0])):
            options = {key: value for key, value in entry.items() if key in _ADDED_TOKEN_FIELDS}
            missing.append(AddedToken(entry["content"], **options))
        for content in self.special_tokens.values():
            if content is not None:
                missing.append(AddedToken(content, special=True, normalized=False))
        new, seen = [], set(known)
        for token in missing:
            if token.content not in seen:
                seen.add(token.content)
                new.append(token)
        if new:
            self._backend.add_tokens(new)

    def _collect_eos_ids(self, generation_config: dict) -> list[int]:
        """EOS ids: the config's `eos_token`, then `generation_config.json`'s `eos_token_id` (int or list)."""
        ids = [] if self._token_id("eos_token") is None else [self._token_id("eos_token")]
        extra = generation_config.get("eos_token_id")
        for token_id in extra if isinstance(extra, list) else [extra]:
            if isinstance(token_id, int) and token_id not in ids:
                ids.append(token_id)
        return ids


_ADDED_TOKEN_FIELDS = ("single_word", "lstrip", "rstrip", "normalized", "special")


def _token_content(value: Any) -> str | None:
    """A special token given as a string or as an AddedToken dict `{"content": ...}`."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _pick_chat_template(value: Any) -> str | None:
    """A template string, or the one named "default" in a list of `{name, template}` dicts."""
    if isinstance(value, list):
        named = {entry.get("name"): entry.get("template") for entry in value if isinstance(entry, dict)}
        return named.get("default")
    return value if isinstance(value, str) and value else None


def _read_json(file: Path) -> dict:
    """The JSON object in `file`, or {} if the file does not exist; `ModelLoadError` if it is corrupt."""
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{file} is not valid JSON ({err}); fix or re-download it.") from err
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file} must hold a JSON object, got {type(data).__name__}; re-download it.")
    return data


# ---- chat template rendering -------------------------------------------------------------------


def _normalize_messages(messages: Any) -> list[dict]:
    """Copy `messages`, dropping keys whose value is None (as transformers does)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts.")
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise InvalidRequestError(f"each message must be a dict with a 'role' key, got {message!r}.")
    return [{key: value for key, value in message.items() if value is not None} for message in messages]


def _plain_chat(messages: list[dict], add_generation_prompt: bool) -> str:
    """Fallback for models without a template: "User: hi\\nAssistant:" (one line per message)."""
    lines = [f"{str(m['role']).capitalize()}: {m.get('content', '')}" for m in messages]
    if add_generation_prompt:
        lines.append("Assistant:")
    return "\n".join(lines)


class _TemplateError(Exception):
    """Raised by a template's `raise_exception(message)`; turned into `InvalidRequestError`."""


def _raise_exception(message: str) -> None:
    raise _TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' `tojson`: plain `json.dumps`, without jinja's HTML escaping."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(jinja2.ext.Extension):
    """Accept transformers' `{% generation %}...{% endgeneration %}` markers; render the body as is."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Namespace(jinja2.utils.Namespace):
    """jinja's `namespace()` refusing underscore names (as in transformers), so templates cannot plant
    dunder attributes on it."""

    def __setitem__(self, name, value):
        _check_namespace_name(name)
        super().__setitem__(name, value)


def _check_namespace_name(name) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} may not start with an underscore")


def _namespace(*args, **kwargs) -> _Namespace:
    attrs = dict(*args, **kwargs)
    for name in attrs:
        _check_namespace_name(name)
    return _Namespace(attrs)


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _namespace
    return env


_ENV = _make_environment()


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    return _ENV.from_string(template)


def render_chat_template(template: str, **variables: Any) -> str:
    """Render a chat template in the sandbox (transformers' environment and globals; `tools=None`).

    Raises `InvalidRequestError` naming the problem if the template does not compile, calls
    `raise_exception`, fails while rendering, or tries to escape the sandbox.
    """
    variables = {"tools": None, "documents": None, **variables}
    try:
        return _compile(template).render(**variables)
    except _TemplateError as err:
        raise InvalidRequestError(f"the chat template rejected the messages: {err}") from err
    except jinja2.exceptions.SecurityError as err:
        raise InvalidRequestError(f"the chat template tried to escape its sandbox: {err}") from err
    except jinja2.TemplateSyntaxError as err:
        raise InvalidRequestError(
            f"the model's chat template has a syntax error (line {err.lineno}): {err.message}; fix "
            f"chat_template in {CONFIG_FILE}."
        ) from err
    except Exception as err:  # anything else a template can raise while rendering untrusted input
        raise InvalidRequestError(
            f"the chat template failed to render ({type(err).__name__}: {err}); check the messages' "
            f"roles and contents."
        ) from err


# ---- streaming detokenization ------------------------------------------------------------------

PROMPT_CONTEXT_TOKENS = 5  # prompt tokens kept as left context, as in vLLM's detokenizer


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas that never end in a broken UTF-8 sequence.

    The prefix/read offset technique of Hugging Face text-generation-inference (`decode_token`) and
    vLLM (`detokenize_incrementally`): keep a short window of recent ids (left context already
    emitted, then pending tokens), decode it, and emit the text beyond the context's text only when it
    does not end in U+FFFD (a multi-byte character still missing bytes). The left context also keeps decoders that strip a
    leading space (Metaspace) correct. Per-step cost depends on the window (tokens since the last
    emitted text, about 1-4 in practice), never on the total length.

    At `finish()`, the concatenated deltas equal `tokenizer.decode(output_ids)` for byte-level BPE
    tokenizers (given a prompt that ends on a character boundary).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # window = [left context (already emitted) | pending tokens (not yet emitted)]
        self._window = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:]) if prompt_ids else []
        self._context_len = len(self._window)
        self._context_text = self._decode(self._window)
        self._text = ""

    @property
    def text(self) -> str:
        """All output text emitted so far (prompt excluded)."""
        return self._text

    def clone(self) -> IncrementalDetokenizer:
        """An independent copy in the same state (for a forked process); shares only the tokenizer."""
        other = object.__new__(IncrementalDetokenizer)
        other.__dict__.update(self.__dict__)
        other._window = list(self._window)
        return other

    def step(self, token_id: int) -> str:
        """Add one generated token; return the newly finalized text ("" while a character is incomplete)."""
        self._window.append(token_id)
        window_text = self._decode(self._window)
        if len(window_text) <= len(self._context_text) or window_text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._emit(window_text)

    def finish(self) -> str:
        """Flush held-back text (e.g. a genuinely invalid byte sequence at the end, as U+FFFD)."""
        window_text = self._decode(self._window)
        if len(window_text) <= len(self._context_text):
            return ""
        return self._emit(window_text)

    def _emit(self, window_text: str) -> str:
        """Emit the pending tokens' text; they become the left context of the next window."""
        delta = window_text[len(self._context_text) :]
        self._window = self._window[self._context_len :]
        self._context_len = len(self._window)
        self._context_text = self._decode(self._window)
        self._text += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
