"""A chat tokenizer's template, checked before a run (``loom validate``): it exists, compiles and renders the task's
conversations, torch- and transformers-free.

The template is what transformers' ``apply_chat_template`` reads (runtime.tokenizer.encode_chat): the folder's
``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of
``{name, template}`` whose ``default`` entry is used). It is compiled and rendered in an environment that mirrors
transformers' (``transformers.utils.chat_template_utils``): jinja2's immutable sandbox with trim_blocks and
lstrip_blocks, the ``loopcontrols`` extension, the ``{% generation %}`` block, and the ``raise_exception``,
``strftime_now`` and ``tojson`` it adds. :func:`check_chat_template` is the entry point; each problem is one
DataError naming the spec field, the folder and the file.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from planner.errors import SpecError
from planner.jsonfile import read_json
from runtime.source_files import TOKENIZER_JSON, DataError, Records
from runtime.tokenizer import GENERATION_TAG

TEMPLATE_FILE = "chat_template.jinja"  # transformers' CHAT_TEMPLATE_FILE: it wins over tokenizer_config.json's
MAX_TEMPLATE_BYTES = 1024 * 1024  # a chat template is a few KB; the largest on the Hub are under 100 KB
MAX_RENDERED_CONVERSATIONS = 32  # one per distinct sequence of roles (what templates refuse): bounded for big files
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers' AssistantTracker, which marks what the model
    generates; here it renders its body (the marks are the runtime's)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def read_chat_template(folder: Path, where: str) -> tuple[str, Path] | None:
    """(template source, file holding it) of the tokenizer saved in ``folder`` (module docstring), or None when it
    has none; a DataError naming ``where`` for a template file that cannot be read."""
    path = folder / TEMPLATE_FILE
    if path.is_file():
        try:
            if path.stat().st_size > MAX_TEMPLATE_BYTES:
                raise DataError(f"{where}: {path}: {path.stat().st_size} bytes, more than {MAX_TEMPLATE_BYTES} for a "
                                "chat template. Give the template itself.")
            return path.read_text(encoding="utf-8"), path
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{where}: {path}: cannot read the chat template as UTF-8 text ({exc}).") from None
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        template = read_json(path, TOKENIZER_JSON).get("chat_template")  # an object: check_tokenizer_folder
    except SpecError as exc:
        raise DataError(f"{where}: {exc}") from None
    if isinstance(template, list):  # transformers' named templates: the default one renders conversations
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if template is not None and not isinstance(template, str):
        raise DataError(f"{where}: {path}: chat_template is a JSON {type(template).__name__}, expected the template's "
                        "text. Save the tokenizer again with tokenizer.save_pretrained.")
    return (template, path) if template else None


def check_chat_template(folder: Path, where: str, records: Records, messages_field: str) -> None:
    """The chat template of the tokenizer in ``folder`` (named by spec field ``where``) exists, compiles and renders
    the conversations of ``records`` (field ``messages_field``): the first of each distinct sequence of roles, up to
    MAX_RENDERED_CONVERSATIONS, as runtime.tokenizer.encode_chat renders them (whole, and for a template without
    ``{% generation %}`` before each assistant turn with the generation prompt). A DataError otherwise."""
    found = read_chat_template(folder, where)
    if found is None:
        raise DataError(f"{where} ({folder}): the tokenizer has no chat_template, which format chat renders "
                        f"conversations with. Add {TEMPLATE_FILE} to the folder, or use format text.")
    source, path = found
    try:
        template = _environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        reason = str(exc.message).rstrip(".")
        raise DataError(f"{where}: {path}: the chat template does not compile (line {exc.lineno}: {reason}). Fix its "
                        "syntax.") from None
    # what transformers passes besides the messages (tools and documents None, not undefined: `is not none` tests)
    given, prefixes = {"tools": None, "documents": None, **_special_tokens(folder)}, not GENERATION_TAG.search(source)
    seen: set[tuple[str, ...]] = set()
    for row, line in zip(records.rows, records.lines):
        messages = row[messages_field]
        roles = tuple(m["role"] for m in messages)
        if roles in seen:
            continue
        seen.add(roles)
        try:
            template.render(messages=messages, add_generation_prompt=False, **given)
            for i in (i for i, role in enumerate(roles) if role == "assistant" and prefixes):
                template.render(messages=messages[:i], add_generation_prompt=True, **given)
        except Exception as exc:  # noqa: BLE001 - the template is the user's code: any error it raises is theirs
            text = str(exc).splitlines()[0] if str(exc) else ""
            raise DataError(f"{where}: {path}: the chat template fails on {records.path} line {line} "
                            f"({type(exc).__name__}: {text}). Fix the template, or the conversation.") from None
        if len(seen) >= MAX_RENDERED_CONVERSATIONS:
            return


def _special_tokens(folder: Path) -> dict[str, str]:
    """The special tokens transformers passes a template, from tokenizer_config.json ("" for one it lacks: a
    template the runtime may still render, so not refused here)."""
    path = folder / "tokenizer_config.json"
    config = read_json(path, TOKENIZER_JSON) if path.is_file() else {}
    tokens = dict.fromkeys(SPECIAL_TOKENS, "")
    for name in SPECIAL_TOKENS:
        value = config.get(name)
        if isinstance(value, dict):  # a saved AddedToken
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens
