"""One set of rules for templates, used by training data, generation and serving alike.

A template is text with ``{name}`` fields, e.g. ``'Review: {input}\\nSentiment:'``; ``{{`` and
``}}`` are literal braces. Nothing but a plain name may stand in braces: no format spec
(``{input:>9}``), no conversion (``{input!r}``), no attribute or index (``{input.x}``), so a
template read from a prompt folder can neither reach into Python objects nor blow a short
input up into a huge one.

How a field gets its value:
- ``{input}`` and ``{<input field>}`` (e.g. ``{review}`` with ``--input-field review``) are the
  input: the record's input field in training, the text given at inference;
- any other name is a field of the record (training, eval) or of ``fields`` at inference
  (``generate --field k=v``, the request's ``fields`` object);
- a template whose fields do not name the input and have exactly one field with no value
  (a prompt saved without its input field's name) gets the input in that field.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable, Mapping

from softprompt.errors import ConfigError, DataError

INPUT = "input"


def template_fields(template: str, flag: str = "--template") -> list[str]:
    """The ``{names}`` a template uses, in order; anything but plain names is a ConfigError
    naming ``flag``."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ConfigError(
            f"{flag} {template!r} is malformed ({err}); write {{input}} or {{field}} for "
            "values and {{ }} for literal braces"
        ) from None
    names = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ConfigError(
                f"{flag} {template!r} has the field {{{shown}}}; only plain names are allowed, "
                "e.g. {input} (no format specs, conversions, attributes or indexes)"
            )
        names.append(name)
    return names


def as_text(value: object) -> str:
    """A field's value as text: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def render(
    template: str | None,
    value: str,
    fields: Mapping[str, object] | None = None,
    input_names: Iterable[str] = (INPUT,),
    where: str = "",
    fields_from: str = "the given fields (--field NAME=VALUE, or the request's `fields`)",
) -> str:
    """Fill ``template`` with the input ``value`` (under every name of ``input_names``) and
    ``fields``. A field with no value is a DataError prefixed by ``where`` ("file:3: ") that
    says where fields come from (``fields_from``)."""
    if template is None:
        return value
    names = template_fields(template)
    inputs = set(input_names)
    values = {k: as_text(v) for k, v in (fields or {}).items()}
    values.update(dict.fromkeys(inputs, value))
    missing = [n for n in dict.fromkeys(names) if n not in values]
    if len(missing) == 1 and not inputs & set(names):  # the only open field is the input
        values[missing.pop()] = value
    if missing:
        known = ", ".join(fields or {}) or "none"
        raise DataError(
            f"{where}template field {{{missing[0]}}} is not in {fields_from} (fields: {known}); "
            "use {input} or a field name, and {{ }} for literal braces"
        )
    return template.format_map(values)


def uses_input(template: str | None, input_names: Iterable[str]) -> bool:
    """Whether the template places the input somewhere (a template that does not would train
    on inputs the model never sees)."""
    return template is None or bool(set(template_fields(template)) & set(input_names))


def apply_template(text: str, template: str | None, fields: Mapping | None = None) -> str:
    """An inference input in its template: ``{input}`` (or the template's one field) is
    ``text``, other fields come from ``fields``."""
    return render(template, text, fields)
