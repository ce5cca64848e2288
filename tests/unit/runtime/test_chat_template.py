"""A chat task's tokenizer template is checked before a run (runtime.chat_template): `loom validate` and `loom run`'s
start-up check refuse a template that is missing, does not compile or fails on the task's conversations in one line;
templates that transformers renders (``{% generation %}``, loop controls, its globals) pass and render the same."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from planner.spec import parse_job
from runtime import sources
from runtime.chat_template import check_chat_template, read_chat_template
from runtime.source_files import DataError, check_data_files, load_records

ROOT = Path(__file__).resolve().parents[3]
CHAT = ROOT / "examples" / "data" / "chat.jsonl"
CONVO = [{"role": "system", "content": "answer in one short sentence ."},
         {"role": "user", "content": "what colour is the sky ?"}, {"role": "assistant", "content": "the sky is blue ."}]
# what transformers accepts beyond plain jinja2: {% generation %}, {% break %}, tojson, raise_exception, namespace
RICH = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if m['role'] == 'tool' %}{% break %}{% endif %}"
        "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
        "{% set ns.n = ns.n + 1 %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}{{ {'turns': ns.n} | tojson }}{{ eos_token }}"
        "{% if tools is not none %}{{ tools | tojson }}{% endif %}")


@pytest.fixture
def tok_dir(tmp_path) -> Path:
    """A copy of the example tokenizer (word level, ChatML template in chat_template.jinja)."""
    return Path(shutil.copytree(ROOT / "examples" / "data" / "tokenizer", tmp_path / "tok"))


def chat_job(tok_dir: Path, path: Path = CHAT):
    return parse_job({
        "name": "chat", "cluster": {"device": "cpu", "devices_per_node": 1},
        "components": {"lm": {"kind": "llama", "num_layers": 1, "hidden_size": 32, "num_heads": 4, "seq_len": 32,
                              "vocab_size": 64}},
        "tasks": [{"name": "t", "batch_size": 2, "loss": "lm", "components": [{"component": "lm"}],
                   "data": {"format": "chat", "path": str(path), "tokenizer": str(tok_dir)}}],
    })


def refusal(job) -> str:
    """The one DataError line of `loom validate`'s check, after `loom run`'s start-up check says the same."""
    with pytest.raises(DataError) as validate:
        check_data_files(job)
    sources._source.cache_clear()
    with pytest.raises(DataError) as run:
        sources.check_data(job)
    assert str(run.value) == str(validate.value) and "\n" not in str(validate.value)
    return str(validate.value)


@pytest.mark.parametrize(("template", "expected"), [
    ("{% for m in messages %}{{ m.content }}", "the chat template does not compile (line 1: Unexpected end of "
                                               "template. Jinja was looking for the following tags: 'endfor'"),
    ("{{ m.content }", "the chat template does not compile (line 1: unexpected '}'). Fix its syntax."),
    ("{% generation %}{{ messages }}", "does not compile (line 1: Unexpected end of template"),
    ("{{ raise_exception('roles must alternate') }}", f"the chat template fails on {CHAT} line 1 (TemplateError: "
                                                      "roles must alternate). Fix the template, or the conversation."),
    ("{{ messages[0].content + 1 }}", f"fails on {CHAT} line 1 (TypeError: "),
    ("{{ messages.__class__.__mro__ }}", "(SecurityError: access to attribute '__class__' of 'list' object is unsafe"),
])
def test_a_chat_template_that_does_not_compile_or_render_is_refused(tok_dir, template, expected) -> None:
    (tok_dir / "chat_template.jinja").write_text(template)
    message = refusal(chat_job(tok_dir))
    assert message.startswith(f"tasks[0].data.tokenizer: {tok_dir / 'chat_template.jinja'}: "), message
    assert expected in message, message


def test_loom_validate_refuses_a_chat_template_that_raises(tmp_path, tok_dir) -> None:
    (tok_dir / "chat_template.jinja").write_text("{% if messages[0]['role'] == 'system' %}"
                                                 "{{ raise_exception('no system role') }}{% endif %}")
    data = tmp_path / "chat.jsonl"  # line 1 has no system turn; line 2 is the first one that fails
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (CONVO[1:], CONVO, CONVO)))
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(json.loads(chat_job(tok_dir, data).model_dump_json(exclude_defaults=True))))
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (f"error: tasks[0].data.tokenizer: {tok_dir / 'chat_template.jinja'}: the chat "
                                     f"template fails on {data} line 2 (TemplateError: no system role). Fix the "
                                     "template, or the conversation.")


def test_a_tokenizer_without_a_chat_template_is_refused(tok_dir) -> None:
    (tok_dir / "chat_template.jinja").unlink()
    assert refusal(chat_job(tok_dir)) == (
        f"tasks[0].data.tokenizer ({tok_dir}): the tokenizer has no chat_template, which format chat renders "
        "conversations with. Add chat_template.jinja to the folder, or use format text.")


def test_the_template_in_tokenizer_config_is_checked_when_there_is_no_jinja_file(tok_dir) -> None:
    (tok_dir / "chat_template.jinja").unlink()
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    for declared in ("{% for m in messages %}", [{"name": "tools", "template": "{{ x }}"},
                                                 {"name": "default", "template": "{% for m in messages %}"}]):
        (tok_dir / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": declared}))
        assert f"{tok_dir / 'tokenizer_config.json'}: the chat template does not compile" in refusal(chat_job(tok_dir))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": RICH}))
    assert read_chat_template(tok_dir, "x") == (RICH, tok_dir / "tokenizer_config.json")
    check_data_files(chat_job(tok_dir))


@pytest.mark.parametrize("template", [None, RICH])
def test_templates_transformers_renders_pass_and_render_as_transformers_does(tok_dir, template) -> None:
    """The check's environment mirrors transformers' (the example's ChatML template, and one using what transformers
    adds to jinja2): the same text for the same conversation, with and without the generation prompt."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from runtime import chat_template
    from runtime.tokenizer import load_tokenizer

    if template is not None:
        (tok_dir / "chat_template.jinja").write_text(template)
    check_data_files(chat_job(tok_dir))
    tokenizer = load_tokenizer(str(tok_dir), "test")
    source, _ = read_chat_template(tok_dir, "x")
    rendered = chat_template._environment().from_string(source)
    assert isinstance(chat_template._environment(), ImmutableSandboxedEnvironment)
    tokens = chat_template._special_tokens(tok_dir) | {"tools": None, "documents": None}
    for messages, prompt in ((CONVO, False), (CONVO[:2], True)):
        assert rendered.render(messages=messages, add_generation_prompt=prompt, **tokens) == (
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt))
    load_tokenizer.cache_clear()


def test_one_conversation_per_sequence_of_roles_is_rendered(tok_dir, monkeypatch) -> None:
    """A large file costs at most MAX_RENDERED_CONVERSATIONS renders of each kind, not one per line."""
    from runtime import chat_template

    rows = [{"messages": CONVO}] * 50 + [{"messages": CONVO[1:]}] * 50
    records = load_records(chat_job(tok_dir).tasks[0].data.model_copy(update={"path": str(_jsonl(tok_dir, rows))}),
                           0, None, True)
    calls: list[int] = []
    real = chat_template._environment

    def counting():
        env = real()
        template_class = env.template_class

        class Counting(template_class):
            def render(self, *args, **kwargs):
                calls.append(1)
                return super().render(*args, **kwargs)

        env.template_class = Counting
        return env

    monkeypatch.setattr(chat_template, "_environment", counting)
    check_chat_template(tok_dir, "x", records, "messages")
    assert len(calls) == 4  # two role sequences: each whole, and before its one assistant turn


def _jsonl(folder: Path, rows: list[dict]) -> Path:
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
