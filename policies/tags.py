"""Job tags: ``--comment "project=llm-pretrain,cost_center=CC42"``.

One parser for the concept. ``parse_tags`` only splits and checks syntax; ``check_tags``
applies the policy (required keys, allowed values, the team's projects, unknown keys) and
returns every problem at once, plus an example line the user can paste.

slurmgate records what it decided in the job's admin_comment (users cannot edit it):
``slurmgate:v2;team=vision;rid=r5f2c...;tags=project=llm-pretrain,cost_center=CC42``, merged
with whatever other tools keep there. ``format_admin_comment``, ``merge_admin_comment`` and
``parse_admin_comment`` are the only writers and reader of it; the keys it uses
(``RESERVED_KEYS``) are refused as user tags.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from policies.config import Policy

KEY_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
VALUE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
ADMIN_COMMENT_PREFIX = "slurmgate:"
UNCHECKED = "slurmgate:unchecked"


@dataclass
class TagCheck:
    """Result of checking a job's tags against the policy."""

    tags: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    example: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors

    def normalised(self) -> str:
        return format_tags(self.tags)


def _show(text: str, limit: int = 40) -> str:
    """Quote user text for a message: printable ASCII only, bounded length."""
    safe = "".join(c if 32 <= ord(c) < 127 else "?" for c in text[:limit])
    return f"'{safe}{'...' if len(text) > limit else ''}'"


def parse_tags(comment: str | None) -> tuple[dict[str, str], list[str]]:
    """Split ``key=value[,key=value...]`` into a dict; return (tags, syntax errors).

    Keys are case-insensitive (stored lower-case); surrounding spaces are ignored;
    an empty comment is no tags.
    """
    tags: dict[str, str] = {}
    errors: list[str] = []
    if comment is None or not comment.strip():
        return tags, errors
    for raw in comment.split(","):
        piece = raw.strip()
        if not piece:
            continue
        if "=" not in piece:
            errors.append(f"{_show(piece)} is not key=value")
            continue
        key, value = (s.strip() for s in piece.split("=", 1))
        key = key.lower()
        if key in RESERVED_KEYS:  # whatever its value: check_tags says it is slurmgate's
            tags.setdefault(key, value)
            continue
        if not KEY_RE.fullmatch(key):
            errors.append(
                f"tag name {_show(key)} is not valid (lower-case letters, digits, '_'; "
                "starting with a letter)"
            )
            continue
        if not VALUE_RE.fullmatch(value):
            errors.append(
                f"value {_show(value)} of tag '{key}' is not valid "
                "(letters, digits and . _ : / @ + -, no spaces or quotes)"
            )
            continue
        if key in tags and tags[key] != value:
            errors.append(f"tag '{key}' is given twice ({tags[key]!r} and {value!r})")
            continue
        tags[key] = value
    return tags, errors


def format_tags(tags: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in tags.items())


def _allowed_for(policy: Policy, team: str | None, key: str) -> tuple[list[str], str, str]:
    """(allowed values, regex, description) for a key, with the team's projects for 'project'."""
    rule = policy.tags.allowed.get(key)
    values = list(rule.values) if rule else []
    regex = rule.regex if rule else ""
    desc = rule.description if rule else ""
    if key == "project" and team and team in policy.teams and policy.teams[team].projects:
        values = list(policy.teams[team].projects)
    return values, regex, desc


def _placeholder(policy: Policy, values: list[str], key: str) -> str:
    """A value to show in the corrected example line."""
    rule = policy.tags.allowed.get(key)
    if values:
        return values[0]
    if rule and rule.example:
        return rule.example
    return f"<{key}>"


def check_tags(comment: str | None, policy: Policy, team: str | None) -> TagCheck:
    result = TagCheck()
    size = len(comment.encode("utf-8", "surrogateescape")) if comment is not None else 0
    if size > policy.tags.max_length:
        result.errors.append(
            f"--comment is {len(comment or '')} characters long; the limit is "
            f"{policy.tags.max_length} (tags only: key=value,key=value)"
        )
        short = {k: _placeholder(policy, _allowed_for(policy, team, k)[0], k)
                 for k in policy.tags.required}
        result.example = f'sbatch --comment "{format_tags(short)}" ...'
        return result
    tags, syntax = parse_tags(comment)
    result.errors.extend(syntax)

    example: dict[str, str] = {}
    valid: dict[str, str] = {}
    for key in policy.tags.required:
        values, regex, desc = _allowed_for(policy, team, key)
        if key not in tags:
            hint = f" ({desc})" if desc else ""
            choices = f"; allowed: {', '.join(values)}" if values else ""
            result.errors.append(f"missing required tag '{key}'{hint}{choices}")
            example[key] = _placeholder(policy, values, key)

    for key in [k for k in tags if k in RESERVED_KEYS]:
        result.errors.append(
            f"tag '{key}' is written by slurmgate itself and cannot be given in --comment: "
            "remove it (your team comes from --account and your team membership)")
        tags.pop(key)
    for key, value in tags.items():
        values, regex, desc = _allowed_for(policy, team, key)
        known = key in policy.tags.required or key in policy.tags.allowed or key == "project"
        known = known or key in ("approval", "ckpt")
        if not known:
            if policy.tags.unknown == "reject":
                result.errors.append(
                    f"unknown tag '{key}' (allowed tags: "
                    f"{', '.join(sorted(set(policy.tags.required) | set(policy.tags.allowed)))})"
                )
                continue
            if policy.tags.unknown == "warn":
                result.warnings.append(f"unknown tag '{key}' kept as given")
            valid[key] = value
            example[key] = value
            continue
        problem = ""
        if values and value not in values:
            owner = f" of team {team}" if key == "project" and team else ""
            problem = (f"{key} {_show(value)} is not an allowed value{owner}; "
                       f"allowed: {', '.join(values)}")
        elif regex and not re.fullmatch(regex, value):
            problem = f"{key} {_show(value)} does not look like {desc or 'the pattern ' + regex}"
        if problem:
            result.errors.append(problem)
            example[key] = _placeholder(policy, values, key)
        else:
            valid[key] = value
            example[key] = value

    ordered = {k: example[k] for k in policy.tags.required if k in example}
    ordered.update({k: v for k, v in example.items() if k not in ordered})
    result.example = f'sbatch --comment "{format_tags(ordered)}" ...'
    required_first = {k: valid[k] for k in policy.tags.required if k in valid}
    required_first.update({k: v for k, v in valid.items() if k not in required_first})
    result.tags = required_first
    return result


ADMIN_COMMENT_VERSION = "v2"
RESERVED_KEYS = frozenset({"team", "rid", "tags", "held", "unchecked", "v", "slurmgate"})
"""Keys slurmgate writes into the admin comment itself: never accepted as user tags."""


def _ours(token: str) -> bool:
    return token.startswith(ADMIN_COMMENT_PREFIX)


def format_admin_comment(team: str, rid: str, tags: dict[str, str]) -> str:
    """slurmgate's own segment: ``slurmgate:v2;team=T;rid=R;tags=k=v,k=v``.

    It holds no whitespace and its fields are separated by ';', which no tag key or value can
    contain (KEY_RE, VALUE_RE), so user text cannot add a field to it; every tag lives inside
    ``tags=``, so no tag can stand for ``team`` or ``rid`` either."""
    parts = [ADMIN_COMMENT_PREFIX + ADMIN_COMMENT_VERSION, f"team={team}", f"rid={rid}"]
    safe = {k: v for k, v in tags.items()
            if KEY_RE.fullmatch(k) and VALUE_RE.fullmatch(v) and k not in RESERVED_KEYS}
    if safe:
        parts.append("tags=" + format_tags(safe))
    return ";".join(parts)


def format_held_comment(code: str) -> str:
    """The segment of a job held by the re-check of an unchecked job: ``slurmgate:v2;held=C``,
    C a short reason code (the full message is an event and in ``slurmgate job``)."""
    code = re.sub(r"[^a-z0-9-]+", "-", code.lower()).strip("-") or "policy"
    return f"{ADMIN_COMMENT_PREFIX}{ADMIN_COMMENT_VERSION};held={code[:40]}"


def merge_admin_comment(existing: str | None, ours: str) -> str:
    """``ours`` first, then whatever other tools keep in the admin comment (Princeton
    jobstats' ``JS1:...``, slurm-quota's UUID), less any older slurmgate segment."""
    others = [t for t in (existing or "").split() if not _ours(t)]
    return " ".join([ours, *others])


def is_unchecked(text: str | None) -> bool:
    """Accepted by job_submit.lua while the daemon was unreachable (fail-open), not yet
    decided: the first slurmgate segment is ``slurmgate:unchecked``."""
    first = next((t for t in (text or "").split() if _ours(t)), None)
    return first == UNCHECKED


def parse_admin_comment(text: str | None) -> dict[str, str]:
    """Read back what slurmgate wrote: ``team``, ``rid`` and the tags (``held`` for a job the
    re-check held). Only the FIRST slurmgate segment counts, and in it the first occurrence of
    each field; other tools' text, 'unchecked' or nothing at all give {}. The v1 form
    (``slurmgate:team=...;rid=...;k=v``) of jobs queued before an upgrade is still read."""
    first = next((t for t in (text or "").split() if _ours(t)), None)
    if first is None or first == UNCHECKED:
        return {}
    body = first[len(ADMIN_COMMENT_PREFIX):]
    fields: dict[str, str] = {}
    parts = body.split(";")
    v2 = parts[0] == ADMIN_COMMENT_VERSION
    for part in parts[1:] if v2 else parts:
        k, sep, v = part.partition("=")
        if sep and k not in fields:
            fields[k] = v
    if not v2:
        return fields
    out: dict[str, str] = {k: fields[k] for k in ("team", "rid", "held") if k in fields}
    tags, _ = parse_tags(fields.get("tags"))
    for k, v in tags.items():
        if k not in RESERVED_KEYS:
            out.setdefault(k, v)
    return out
