"""Reading a job spec file: plain data from YAML, bounded (size, nesting), with unique keys and safe tags only.

:func:`load_yaml` is what planner.spec.load_job parses; every problem with the file itself (missing, oversized,
binary, not UTF-8, a syntax error, a key given twice, nesting too deep) is one SpecError naming the file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from planner.errors import SpecError

MAX_SPEC_BYTES = 256 * 1024  # a job spec is a few KB; PyYAML parses ~100 KB/s on a busy core
MAX_YAML_DEPTH = 32  # a job spec nests 5 levels; PyYAML composes nested nodes recursively (10,000 `[` overflow it)
_UNKNOWN_TAG = re.compile(r"could not determine a constructor for the tag '([^']*)'")


@dataclass(frozen=True)
class YamlKind:
    """One kind of YAML file Loom reads, for its messages: ``name`` ("job spec": "too large for a job spec") and
    ``fix`` ("give the job's YAML file": what to give instead of a file that is not one)."""

    name: str
    fix: str


JOB_SPEC = YamlKind("job spec", "give the job's YAML file")
CLUSTER_FILE = YamlKind("cluster file", "give the --cluster YAML file (a `cluster:` section or its fields)")


class _SpecLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no tags that run code) that refuses a key given twice in one mapping (YAML 1.2 says
    keys are unique; PyYAML keeps the last value silently) and nesting deeper than ``MAX_YAML_DEPTH``."""

    _depth = 0

    def _too_deep(self, line: int) -> SpecError:
        return SpecError(f"line {line + 1}: the YAML nests deeper than {MAX_YAML_DEPTH} levels; a job spec nests "
                         "about 5. Fix the brackets or indentation.")

    def fetch_flow_collection_start(self, TokenClass):  # noqa: ANN001, N803 - PyYAML's signature
        # the scanner's cost grows with the open `[`/`{` (each one is a possible key): stop at the limit, not at the end
        if self.flow_level >= MAX_YAML_DEPTH:
            raise self._too_deep(self.line)
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise self._too_deep(self.peek_event().start_mark.line)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):  # noqa: ANN001 - PyYAML's signature
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may repeat; flatten_mapping merges it
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise SpecError(f"line {key_node.start_mark.line + 1}: key '{key}' is given twice in one mapping "
                                    f"(first at line {seen[key]}); YAML keeps only the last. Remove one of them.")
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path, kind: YamlKind = JOB_SPEC) -> Any:
    """Read a YAML file (a ``kind``, for the messages) as plain data (``_SpecLoader``: safe tags only, unique keys,
    bounded nesting). A missing file, a directory or other file that is not a regular one (a device, a pipe), an
    oversized, binary or non-UTF-8 file, a YAML syntax error, a tag that is not plain data (``!!python/object``), a
    duplicate key or too deep nesting becomes one SpecError that names the file (and the line)."""
    path = Path(path)
    if not path.is_file():
        what = "no such file. Check the path" if not path.exists() else (
            f"a directory, not a {kind.name}; {kind.fix}" if path.is_dir()
            else f"not a regular file (a device, pipe or socket); {kind.fix}")
        raise SpecError(f"{path}: {what}.")
    size = path.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: {size} bytes is too large for a {kind.name} (at most {MAX_SPEC_BYTES}); "
                        f"{kind.fix}.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not a UTF-8 text file (byte {exc.start} is 0x{raw[exc.start]:02x}); "
                        f"{kind.fix}.") from None
    if "\0" in text:
        raise SpecError(f"{path}: a binary file (it holds NUL bytes), not YAML; {kind.fix}.")
    try:
        return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - _SpecLoader is a SafeLoader
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        tag = _UNKNOWN_TAG.search(str(getattr(exc, "problem", "")))
        if tag is not None:  # SafeLoader constructs no objects: the file parses, the tag is refused
            shown = tag.group(1).replace("tag:yaml.org,2002:", "!!")
            raise SpecError(f"{path}: the tag '{shown}'{where} is not allowed; a {kind.name} holds plain data "
                            "(mappings, lists, strings, numbers). Remove the tag.") from None
        raise SpecError(f"{path}: not valid YAML{where}. Fix the syntax.") from None


def read_job_document(path: str | Path, cluster: str | Path | None = None) -> Any:
    """A job file's parsed document; ``cluster`` (a YAML file holding a `cluster:` section or its fields) replaces
    its `cluster:` section. What planner.spec.load_job and planner.pipeline read."""
    data = load_yaml(path)
    if cluster is not None and isinstance(data, dict):
        data = {**data, "cluster": read_cluster_section(cluster)}
    return data


def read_cluster_section(path: str | Path) -> dict[str, Any]:
    """A ``--cluster`` file's section: a non-empty mapping, either ``cluster: {...}`` alone or the section's fields
    (checked by planner.spec.ClusterSpec). An empty file or section would silently mean the default cluster, and a
    key beside ``cluster:`` would be ignored: both are one SpecError naming the file."""
    data = load_yaml(path, CLUSTER_FILE)
    if isinstance(data, dict) and "cluster" in data:
        for key in data:
            if key != "cluster":
                raise SpecError(f"{path}: {key}: unknown key beside `cluster:`; a cluster file holds only the "
                                "`cluster:` section (or only its fields). Remove it.")
        data = data["cluster"]
    if not isinstance(data, dict) or not data:
        shown = "empty" if not data else f"a {type(data).__name__}, not a mapping"
        raise SpecError(f"{path}: the cluster section is {shown}; expected `cluster: {{num_nodes: ..., "
                        "devices_per_node: ..., device: ...}}` (or those fields). Fill it in; without --cluster the "
                        "spec's own cluster is used.")
    return data
