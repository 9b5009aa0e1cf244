"""lm-evaluation-harness adapter: score a soft prompt on any harness task.

Importing this module registers the model ``softprompt`` with lm_eval (which finds models
only in its registry: it has no plugin entry points for them), so from Python::

    import lm_eval, softprompt.harness
    lm_eval.simple_evaluate(model="softprompt", model_args="prompt=runs/sentiment", tasks=[...])

and from the shell, ``python -m softprompt.harness`` is lm_eval's own command line with the
model registered (``--include_path DIR`` adds task YAML files, as in lm_eval)::

    python -m softprompt.harness run --model softprompt --model_args prompt=runs/sentiment \\
        --tasks my_task --include_path tasks/

The three requests reuse softprompt's own scoring and generation: ``loglikelihood`` and
``loglikelihood_rolling`` score rows with ``loss.row_scores`` (the prompt put before each
row as in ``softprompt eval``), ``generate_until`` runs the compiled prefix of
``generation``. The task's text is the input as it is; ``template=prompt`` renders it
through the prompt's saved format instead (its template, ``{soft_prompt}`` marker or chat
placement), as ``softprompt generate`` renders its inputs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import (
    get_rolling_token_windows,
    make_disjoint_window,
    simple_parse_args_string,
)
from transformers import StoppingCriteria, StoppingCriteriaList

from softprompt.artifacts import load_prompt, read_meta, trained_base_model
from softprompt.config import GenerateConfig, ModelConfig
from softprompt.errors import ConfigError
from softprompt.generation import generate_ids, generation_config
from softprompt.loading import load_model
from softprompt.prefix import compile_all
from softprompt.prompt import max_positions
from softprompt.rows import IGNORE_INDEX, Row, encode_chat, encode_raw
from softprompt.scoring import row_scores
from softprompt.templates import PromptFormat

TEMPLATE_MODES = ("task", "prompt")


def _flag(value: object) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("softprompt")
class SoftPromptLM(LM):
    """A frozen base model with an optional soft prompt, for lm_eval.

    ``--model_args``: ``prompt=DIR`` (none: the base model), ``model=`` (default: the one
    the prompt was trained on), ``dtype=auto|float32|bfloat16`` (auto, as ``--dtype``),
    ``template=task|prompt``, ``max_gen_toks=256``, ``allow_mismatch=false``,
    ``batch_size=`` (else lm_eval's ``--batch_size``)."""

    def __init__(
        self,
        prompt: str | None = None,
        model: str | None = None,
        dtype: str = "auto",
        template: str = "task",
        batch_size: int | str = 8,
        max_gen_toks: int | str = 256,
        allow_mismatch: bool | str = False,
        **_ignored,  # lm_eval passes device, max_batch_size, ...: one CPU/GPU process here
    ) -> None:
        super().__init__()
        if template not in TEMPLATE_MODES:
            raise ConfigError(f"model_args template must be task or prompt, not {template!r}")
        name = model or (trained_base_model(prompt) if prompt else None)
        self.loaded = load_model(ModelConfig(model=name, dtype=dtype))
        self.prompt = None
        self.fmt = PromptFormat.from_meta(read_meta(prompt)) if prompt else PromptFormat()
        if prompt:
            loaded_prompt, _ = load_prompt(prompt, self.loaded.model, _flag(allow_mismatch))
            self.prompt = loaded_prompt.to(self.loaded.model.device)
        self.use_template = template == "prompt"
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto": 8
        self.max_gen_toks = int(max_gen_toks)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lm_eval's constructor from ``--model_args``, where ``batch_size=`` in the model
        arguments wins over ``--batch_size`` (lm_eval passes both: the default one would
        raise "got multiple values for keyword argument")."""
        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **args})

    # --- tokens --------------------------------------------------------------------------

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def _context(self, text: str) -> tuple[list[int] | None, list[int]]:
        """(head, ids) of a task's context: as it is (the prompt first), or rendered through
        the prompt's saved format with ``template=prompt``."""
        if not self.use_template:
            return None, self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if self.fmt.chat:
            return encode_chat(self.tokenizer, self.fmt, [{"role": "user", "content": text}])
        return encode_raw(self.tokenizer, self.fmt, text)

    def _score(self, rows: list[Row]) -> list[tuple[float, int, bool]]:
        model, pad = self.loaded.model, self.tokenizer.pad_token_id
        return row_scores(model, self.prompt, rows, self.batch_size, pad)

    # --- the three requests ----------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log-probability of the continuation after the context, greedy?) per request.
        The context's trailing whitespace moves to the continuation (as lm_eval does); the
        continuation is tokenized on its own, as ``softprompt eval`` scores choices."""
        rows = []
        for context, continuation in (r.args for r in requests):
            n = len(context) - len(context.rstrip())
            if n:
                context, continuation = context[:-n], context[-n:] + continuation
            head, ids = self._context(context)
            cont = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            if not ids and not head and self.prompt is None:  # nothing to condition on
                ids = [self._prefix_token()]
            start = (head or []) + ids
            labels = [IGNORE_INDEX] * len(start) + cont
            rows.append(Row(start + cont, labels, prompt_at=len(head or [])))
        return [(logp, greedy) for logp, _, greedy in self._score(rows)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-probability of each whole text, the first token conditioned on the BOS
        (or EOS) token after the prompt; texts longer than the model's positions are
        scored in lm_eval's disjoint rolling windows."""
        out = []
        limit = max_positions(self.loaded.model) or 1 << 30
        room = limit - (self.prompt.num_virtual_tokens if self.prompt is not None else 0)
        for (text,) in (r.args for r in requests):
            tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            windows = map(
                make_disjoint_window,
                get_rolling_token_windows(tokens, self._prefix_token(), room, 1),
            )
            rows = [
                Row(ctx + pred, [IGNORE_INDEX] * len(ctx) + pred, prompt_at=0)
                for ctx, pred in windows
            ]
            out.append(sum(logp for logp, _, _ in self._score(rows)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) continuations, cut at the first ``until``
        string; requests with the same settings run in batches from the compiled prefix."""
        args = [r.args for r in requests]
        out: list[str | None] = [None] * len(args)
        groups: dict[str, list[int]] = {}
        for i, (_, kwargs) in enumerate(args):
            groups.setdefault(repr(sorted((kwargs or {}).items())), []).append(i)
        for idx in groups.values():
            kwargs = dict(args[idx[0]][1] or {})
            for i, text in zip(idx, self._generate([args[i][0] for i in idx], kwargs)):
                out[i] = text
        return out  # type: ignore[return-value]

    def _generate(self, contexts: list[str], kwargs: dict) -> Iterable[str]:
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sample = _flag(kwargs.get("do_sample", False)) and float(kwargs.get("temperature", 1)) > 0
        cfg = GenerateConfig(
            max_new_tokens=int(kwargs.get("max_gen_toks", self.max_gen_toks)),
            temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
            top_p=float(kwargs.get("top_p", 1.0)) if sample else 1.0,
            batch_size=self.batch_size,
        )
        model, tok = self.loaded.model, self.tokenizer
        torch.manual_seed(cfg.seed)
        stop_ids = self.fmt.stop_ids(tok) if self.use_template else None
        gen_cfg = generation_config(tok, cfg, stop_ids)
        stopping = StoppingCriteriaList([StopAt(tok, until)]) if until else None
        encoded = [self._context(c) for c in contexts]
        heads = [h for h, _ in encoded]
        ids = [(h or []) + i if self.prompt is None else i for h, i in encoded]
        prompts = compile_all(model, [self.prompt] * len(ids), heads)
        for start in range(0, len(ids), cfg.batch_size):
            window = slice(start, start + cfg.batch_size)
            new = generate_ids(model, ids[window], prompts[window], gen_cfg, stopping, True,
                               heads[window])  # fmt: skip
            for row in new:
                text = tok.decode(row, skip_special_tokens=True)
                for stop in until:  # the answer ends before the first stop string
                    text = text.split(stop)[0] if stop else text
                yield text

    def _prefix_token(self) -> int:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


class StopAt(StoppingCriteria):
    """Stop a row once its new text holds one of ``stops`` (transformers' StopStringCriteria
    needs a tokenizer whose pieces it can read; this decodes, whatever the tokenizer)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        done = [any(s in t for s in self.stops) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def main(argv: list[str] | None = None) -> None:
    """lm_eval's command line, with the ``softprompt`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
