"""Which layers a config adapts, and with which rank: PEFT's ``rank_pattern``,
``alpha_pattern``, ``layers_to_transform`` and ``layers_pattern``, matched as PEFT matches
them (``peft.utils.other.get_pattern_key`` and ``check_target_module_exists``).

* ``rank_pattern`` / ``alpha_pattern``: {pattern: r} / {pattern: lora_alpha}. A module at
  ``path`` takes the value of the first pattern (in the dict's order) for which
  ``re.match(rf"(.*\\.)?({pattern})$", path)`` succeeds: a leaf name (``"q_proj"``), a
  suffix (``"attn.q_proj"``), a full path or a regular expression (``"blocks\\.0\\..*"``).
  Other modules keep ``r`` / ``lora_alpha``.
* ``layers_to_transform``: an index or a list of them; only targets in those layers are
  adapted. A path's layer index is the first number after ``layers_pattern``
  (``"blocks"`` in minilora's GPT), or, without a pattern, the number in the second path
  component of a path with at least three dots before it (PEFT's ``.*?\\.[^.]*\\.(\\d+)\\.``:
  it finds HF's ``model.layers.3.`` but not minilora's ``blocks.3.``, so minilora's models
  need ``layers_pattern="blocks"``, as a PEFT user of the PyTorch port does).

Patterns come from files (an adapter_config.json), so each match runs with a time limit
(:func:`match_path`, the ``regex`` package's ``timeout``): a pattern that backtracks
catastrophically, such as ``(.|.|.)*b``, is refused, named, instead of running for hours.

``import minilora`` registers the three rules below with the book's ``LoRAConfig``
(``lora.CONFIG_CHECKS``, ``lora.TARGET_FILTERS``, ``lora.MODULE_SETTINGS``).
"""

from __future__ import annotations

from dataclasses import replace

import regex  # Python's `re` has no time limit

from minilora import lora

# The longest one match of a pattern from a file may take: real patterns take microseconds
# on a module path; a catastrophically backtracking one would take hours.
PATTERN_SECONDS = 0.5


def match_path(expression: str, path: str, pattern: str, full: bool = False):
    """``regex.match`` (``fullmatch`` with ``full``) of ``expression`` on a module path, or a
    ValueError naming ``pattern`` (what the file wrote) when it takes over
    :data:`PATTERN_SECONDS`."""
    try:
        return (regex.fullmatch if full else regex.match)(expression, path, timeout=PATTERN_SECONDS)
    except TimeoutError:
        raise ValueError(
            f"the regular expression {pattern!r} took more than {PATTERN_SECONDS} s to match "
            f"the module path {path!r}: it backtracks catastrophically (a repetition inside "
            "a repetition, such as (.*.*)* or (.|.)*); write it without one"
        ) from None


def paths_matching(targets: str, paths: list[str]) -> tuple[list[str], list[str]]:
    """(the ``paths`` that ``target_modules`` given as a string fully matches, as PEFT's
    ``re.fullmatch``; the problems: an invalid or catastrophically slow expression)."""
    try:
        return [p for p in paths if match_path(targets, p, targets, full=True)], []
    except regex.error as e:
        return [], [f"target_modules={targets!r} is not a valid regular expression: {e}"]
    except ValueError as e:
        return [], [f"target_modules: {e}"]


def get_pattern_key(pattern_keys, path: str) -> str | None:
    """The first key of ``pattern_keys`` that matches ``path`` (PEFT's rule), or None."""
    for key in pattern_keys:
        if match_path(rf"(.*\.)?({key})$", path, key):
            return key
    return None


def pattern_value(pattern: dict, path: str, default):
    """``pattern[key]`` for the key that matches ``path``, else ``default``."""
    key = get_pattern_key(pattern, path)
    return default if key is None else pattern[key]


def layer_index(path: str, layers_pattern=None) -> int | None:
    """The layer index of a module path, found as PEFT finds it (None when there is none)."""
    if layers_pattern in (None, "", []):
        regexes = [r".*?\.[^.]*\.(\d+)\."]
    else:
        names = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        regexes = [rf"(?:^|.*?\.){name}\.(\d+)\." for name in names]
    for expression in regexes:
        match = match_path(expression, path, layers_pattern)
        if match:
            return int(match.group(1))
    return None


def in_layers(path: str, layers_to_transform, layers_pattern=None) -> bool:
    """True when ``layers_to_transform`` is unset (None or []) or names the layer of ``path``."""
    if layers_to_transform is None or layers_to_transform == []:
        return True
    wanted = {layers_to_transform} if isinstance(layers_to_transform, int) else layers_to_transform
    return layer_index(path, layers_pattern) in set(wanted)


def check_patterns(owner: str, rank_pattern, alpha_pattern, layers_to_transform, layers_pattern):
    """Refuse patterns of the wrong type (ValueError naming the field and the value)."""

    def positive(v, integral: bool) -> bool:
        if isinstance(v, bool) or not isinstance(v, int if integral else (int, float)):
            return False
        return 0 < v < float("inf")

    for name, pattern, integral in (
        ("rank_pattern", rank_pattern, True),
        ("alpha_pattern", alpha_pattern, False),
    ):
        if not isinstance(pattern, dict) or not all(
            isinstance(k, str) and positive(v, integral) for k, v in pattern.items()
        ):
            what = "positive integer ranks" if integral else "positive finite alphas"
            raise ValueError(
                f"{owner}: {name}={pattern!r} must be a dict from module-name patterns to {what}"
            )
        for key in pattern:
            try:
                regex.compile(key)
            except regex.error as e:
                raise ValueError(
                    f"{owner}: {name} key {key!r} is not a valid regular expression: {e}"
                ) from None
    layers = layers_to_transform
    if layers is not None and not is_layer_selection(layers):
        raise ValueError(
            f"{owner}: layers_to_transform={layers!r} must be None, a layer index or a list of them"
        )
    lp = layers_pattern
    if lp is not None and not is_name_selection(lp):
        raise ValueError(f"{owner}: layers_pattern={lp!r} must be None, a name or a list of names")


def _index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_layer_selection(value) -> bool:
    """A layer index or a list of them: the forms ``layers_to_transform`` takes."""
    return _index(value) or (isinstance(value, list) and all(_index(i) for i in value))


def is_name_selection(value) -> bool:
    """A name or a list of names: the forms ``layers_pattern`` takes."""
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(t, str) for t in value)
    )


def check_config(config) -> None:
    """``LoRAConfig``'s four pattern fields, checked (:func:`check_patterns`)."""
    check_patterns(
        "LoRAConfig",
        config.rank_pattern,
        config.alpha_pattern,
        config.layers_to_transform,
        config.layers_pattern,
    )


def in_transformed_layers(config, path: str) -> bool:
    """True when the target at ``path`` is inside ``layers_to_transform``; as in PEFT, a
    target that is the full path is adapted whatever the layers say."""
    return path in config.target_modules or in_layers(
        path, config.layers_to_transform, config.layers_pattern
    )


def module_settings(config, path: str):
    """``config`` with the ``r`` and ``lora_alpha`` that the patterns give ``path``."""
    r = pattern_value(config.rank_pattern, path, config.r)
    alpha = pattern_value(config.alpha_pattern, path, config.lora_alpha)
    return replace(config, r=r, lora_alpha=alpha)


lora.CONFIG_CHECKS.append(check_config)
lora.TARGET_FILTERS.append(in_transformed_layers)
lora.MODULE_SETTINGS.append(module_settings)
