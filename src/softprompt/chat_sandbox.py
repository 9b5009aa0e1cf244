"""Chat templates rendered with limits: a template read from a prompt folder or a tokenizer
is someone else's program, so it runs in Jinja's immutable sandbox (no attribute of Python's
internals, no mutation of the data it is given) and within bounds:

- at most ``MAX_CHARS`` characters of output (counted as it is produced), and no string or
  list built inside the template (``'x' * n``, ``a + b``, a namespace's growing value) past
  that size;
- at most ``MAX_SECONDS`` of rendering: every call, attribute, item and ``range`` step
  checks the clock, and a watchdog interrupts a loop that touches none of them.

What it renders is what ``tokenizer.apply_chat_template(..., tokenize=False)`` renders: the
same globals (``raise_exception``, ``strftime_now``, ``tojson``), loop controls, the
``{% generation %}`` tag, and the tokenizer's special tokens as variables.
"""

from __future__ import annotations

import ctypes
import functools
import json
import threading
import time
from collections.abc import Sequence
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

MAX_CHARS = 1_000_000
MAX_SECONDS = 2.0
MAX_WIDTH = 10_000  # the largest number a string method or filter may take (widths)
_state = threading.local()  # this thread's render deadline


class TemplateLimit(Exception):
    """A chat template went past a limit (its output's size or its time)."""


def _tick() -> None:
    deadline = getattr(_state, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise TemplateLimit(f"the chat template ran for more than {MAX_SECONDS:g} s")


def _fits(size: int) -> None:
    if size > MAX_CHARS:
        raise TemplateLimit(f"the chat template built a value over {MAX_CHARS} items long")


def _sized(value):
    if isinstance(value, (str, list, tuple, dict)):
        _fits(len(value))
    return value


class _Limited(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+"})  # the ones that can build huge values

    def call_binop(self, context, operator, left, right):
        _tick()
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                _fits(len(seq) * n)  # refused before it is built
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise TemplateLimit("the chat template raised a number to a power over 64")
        if operator == "+" and hasattr(left, "__len__") and hasattr(right, "__len__"):
            _fits(len(left) + len(right))
        return _sized(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's signature
        _tick()
        if isinstance(getattr(__obj, "__self__", None), str):  # 'x'.ljust(10**9) and the like
            _small_numbers(args, kwargs)
        return _sized(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj, attribute):
        _tick()
        return _sized(super().getattr(obj, attribute))

    def getitem(self, obj, argument):
        _tick()
        return _sized(super().getitem(obj, argument))


def _small_numbers(args, kwargs) -> None:
    if any(isinstance(a, int) and abs(a) > MAX_WIDTH for a in (*args, *kwargs.values())):
        raise TemplateLimit(f"the chat template passed a width over {MAX_WIDTH}")


def _limited_filter(f):
    @functools.wraps(f)
    def run(*args, **kwargs):
        _tick()
        _small_numbers(args[1:], kwargs)  # indent(10**9), center(10**9), ...
        return _sized(f(*args, **kwargs))

    return run


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (marks assistant text): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _MeteredRange(Sequence):
    """Jinja's ``range`` (at most ``MAX_RANGE`` items), checking the clock at every step."""

    def __init__(self, *args):
        self.items = safe_range(*args)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]

    def __iter__(self):
        for i in self.items:
            _tick()
            yield i


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    text = json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)  # fmt: skip
    return _sized(text)


@functools.lru_cache(maxsize=64)
def compile_chat_template(source: str) -> jinja2.Template:
    """The template in the limited sandbox (a TemplateSyntaxError if it does not parse)."""
    env = _Limited(trim_blocks=True, lstrip_blocks=True,
                   extensions=[_Generation, jinja2.ext.loopcontrols])  # fmt: skip
    env.filters["tojson"] = _tojson
    env.filters.update({name: _limited_filter(f) for name, f in env.filters.items()})
    env.globals.update(raise_exception=_raise, range=_MeteredRange,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))  # fmt: skip
    return env.from_string(source)


def render_chat_template(source: str, **variables) -> str:
    """``source`` rendered with ``variables`` within the limits (else a TemplateLimit)."""
    template = compile_chat_template(source)
    try:
        return _render(template, variables)
    except TemplateLimit as err:  # the watchdog's has no message
        message = str(err) or f"the chat template ran for more than {MAX_SECONDS:g} s"
        raise TemplateLimit(message) from None


def _render(template: jinja2.Template, variables: dict) -> str:
    out, size = [], 0
    with _deadline():
        for piece in template.generate(**variables):
            size += len(piece)
            if size > MAX_CHARS:
                raise TemplateLimit(f"the chat template renders more than {MAX_CHARS} characters")
            out.append(piece)
            _tick()
    return "".join(out)


class _deadline:
    """Set this thread's deadline; a watchdog raises TemplateLimit in it if it is still
    rendering past the deadline (a loop that calls nothing never checks the clock)."""

    def __enter__(self):
        _state.deadline = time.monotonic() + MAX_SECONDS
        self.lock, self.done = threading.Lock(), False
        self.ident = threading.get_ident()
        self.timer = threading.Timer(MAX_SECONDS + 0.5, self._interrupt)
        self.timer.daemon = True
        self.timer.start()

    def _interrupt(self):
        with self.lock:
            if not self.done:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(self.ident), ctypes.py_object(TemplateLimit)
                )

    def __exit__(self, *exc):
        with self.lock:
            self.done = True
        self.timer.cancel()
        _state.deadline = None
        return False


def tokenizer_variables(tokenizer) -> dict:
    """What apply_chat_template passes a template besides the messages: the special tokens."""
    specials = dict(getattr(tokenizer, "special_tokens_map", {}) or {})
    return {k: v for k, v in specials.items() if isinstance(v, (str, list))}
