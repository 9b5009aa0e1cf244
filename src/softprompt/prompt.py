"""The soft prompt: N learnable vectors put in front of the token embeddings.

The prompt lives in the space of what the model's input-embedding layer
*returns* (Gemma multiplies token vectors by sqrt(hidden) inside that layer),
so it can be concatenated with the embedded text as is. It is kept in float32
and cast to the model's dtype only where the two meet, in ``prepend``.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softprompt.config import PromptConfig
from softprompt.console import warn
from softprompt.errors import ConfigError, SoftpromptError
from softprompt.rows import IGNORE_INDEX

VOCAB_INIT_POOL = 5000  # Lester et al. sample from the 5,000 most common tokens


class SoftPrompt(nn.Module):
    """``num_virtual_tokens`` learnable embeddings, float32, shape (N, H)."""

    def __init__(self, embeddings: Tensor):
        super().__init__()
        self.embedding = nn.Parameter(embeddings.detach().float().clone())  # (N, H)

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.embedding.shape[1]

    def prepend(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None = None,
        at: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Put the prompt before each row (or before token ``at[i]`` of row i): embeds
        (B, N+T, H), mask (B, N+T), labels (B, N+T)."""
        b = inputs_embeds.shape[0]
        virtual = self.embedding.unsqueeze(0).expand(b, -1, -1)
        return prepend(virtual, inputs_embeds, attention_mask, labels, at)


class DeepPrompt(SoftPrompt):
    """A deep prompt (prefix tuning, Li & Liang 2021; P-tuning v2): N trained key and value
    vectors for every attention layer, no input vectors.

    Stored as PEFT's PREFIX_TUNING tensor, float32, (N, layers x 2 x KV width): for each
    virtual token, layer 0's key and value, then layer 1's, ... (each KV heads x head dim).
    It is what a compiled input-layer prompt holds (``prefix.compile_prefix``), trained
    directly: the model reads it from its cache, so there is nothing to put in the input.
    """

    def __init__(self, flat: Tensor, layers: int, kv_heads: int, head_dim: int):
        if flat.ndim != 2 or flat.shape[1] != layers * 2 * kv_heads * head_dim:
            raise ConfigError(
                f"a deep prompt for {layers} layers of {kv_heads} x {head_dim} keys/values "
                f"has {layers * 2 * kv_heads * head_dim} values per token, not "
                f"{tuple(flat.shape)}"
            )
        super().__init__(flat)
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim

    @property
    def layout(self) -> tuple[int, int, int]:
        """(layers, KV heads, head dim): the shape of the model's attention it fits."""
        return self.layers, self.kv_heads, self.head_dim

    def prepend(self, inputs_embeds, attention_mask, labels=None, at=None):
        raise SoftpromptError(
            "a deep prompt (--method prefix) has no input vectors to put before the text: it "
            "runs from the model's cache (this path takes input-layer prompts only)"
        )


class ProjectedPrefix(nn.Module):
    """A deep prompt trained through a projection (Li & Liang 2021's reparameterisation,
    PEFT's ``prefix_projection``): the keys/values are ``start + MLP(P)``, P (N, H) a small
    prompt and the MLP (H -> ``hidden`` -> layers x 2 x KV width, tanh) shared by the N tokens.
    Its last layer starts at zero, so at step 0 the prefix is ``start`` (the keys/values of
    the --init prompt). Training only: the run saves the projection's output as a plain
    ``DeepPrompt`` (as PEFT saves a projected prefix)."""

    def __init__(self, start: DeepPrompt, small: Tensor, hidden: int, seed: int = 0):
        super().__init__()
        self.layers, self.kv_heads, self.head_dim = start.layout
        self.register_buffer("start", start.embedding.detach().float().clone())  # (N, D')
        self.raw = nn.Parameter(small.detach().float().clone())  # (N, H)
        with torch.random.fork_rng(devices=[]):  # the MLP's init leaves the global RNG alone
            torch.manual_seed(seed)
            self.down = nn.Linear(small.shape[1], hidden)
            self.up = nn.Linear(hidden, self.start.shape[1])
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @property
    def embedding(self) -> Tensor:
        """The prefix, (N, layers x 2 x KV width)."""
        return self.start + self.up(torch.tanh(self.down(self.raw)))

    @property
    def layout(self) -> tuple[int, int, int]:
        return self.layers, self.kv_heads, self.head_dim

    @property
    def num_virtual_tokens(self) -> int:
        return self.start.shape[0]

    def put(self, value: Tensor) -> None:
        """Make the prefix equal ``value`` exactly: start = value, the last layer zeroed."""
        with torch.no_grad():
            self.start.copy_(value)
            self.up.weight.zero_()
            self.up.bias.zero_()

    def plain(self) -> DeepPrompt:
        return DeepPrompt(self.embedding.detach(), *self.layout)


def deep_layout(prompt) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a deep prompt or of a ``PromptSet`` of them."""
    first = prompt.prompts[0] if isinstance(prompt, PromptSet) else prompt
    return first.layout


def is_deep(prompt) -> bool:
    """Whether ``prompt`` (a prompt, a ``PromptSet``, or None) holds deep prompts."""
    if isinstance(prompt, PromptSet):
        prompt = prompt.prompts[0]
    return isinstance(prompt, (DeepPrompt, ProjectedPrefix))


class ResidualPrompt(nn.Module):
    """Residual reparameterisation (Razdaibiedina et al. 2023): the prompt the model sees is
    ``P + LayerNorm(MLP(P))``, the MLP a bottleneck (H -> ``bottleneck`` -> H, ReLU) shared
    by the N tokens. The LayerNorm's weight starts at 0, so at step 0 the mapped prompt is P
    itself. Training only: the run saves the mapped prompt as a plain ``SoftPrompt``."""

    def __init__(self, embeddings: Tensor, bottleneck: int, seed: int = 0):
        super().__init__()
        hidden = embeddings.shape[1]
        self.raw = nn.Parameter(embeddings.detach().float().clone())  # (N, H)
        with torch.random.fork_rng(devices=[]):  # the MLP's init leaves the global RNG alone
            torch.manual_seed(seed)
            self.mlp = nn.Sequential(
                nn.Linear(hidden, bottleneck), nn.ReLU(), nn.Linear(bottleneck, hidden)
            )
        self.norm = nn.LayerNorm(hidden)
        nn.init.zeros_(self.norm.weight)

    @property
    def embedding(self) -> Tensor:
        """The mapped prompt, (N, H)."""
        return self.raw + self.norm(self.mlp(self.raw))

    @property
    def num_virtual_tokens(self) -> int:
        return self.raw.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.raw.shape[1]

    def put(self, value: Tensor) -> None:
        """Make the mapped prompt equal ``value`` (N, H) exactly: P = value, LayerNorm
        zeroed (the MLP's output then adds nothing)."""
        with torch.no_grad():
            self.raw.copy_(value)
            self.norm.weight.zero_()
            self.norm.bias.zero_()

    def prepend(self, inputs_embeds, attention_mask, labels=None, at=None):
        b = inputs_embeds.shape[0]
        virtual = self.embedding.unsqueeze(0).expand(b, -1, -1)
        return prepend(virtual, inputs_embeds, attention_mask, labels, at)


class PromptSet(nn.Module):
    """One soft prompt per task, trained side by side on one frozen model.

    A batch may mix tasks: ``batch["task"]`` (B,) holds each row's index into ``names``.
    Each task's prompt is its own parameter, so a task absent from a step gets no gradient
    (and no optimizer update).
    """

    def __init__(self, names: list[str], prompts: list[SoftPrompt], dropout: float = 0.0):
        super().__init__()
        if len({p.embedding.shape for p in prompts}) != 1:
            raise ConfigError("every task's prompt needs the same number of virtual tokens")
        self.names = list(names)
        self.prompts = nn.ModuleList(prompts)
        self.dropout = dropout  # --prompt-dropout, applied by rows_prompts while training

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompts[0].num_virtual_tokens

    def stacked(self) -> Tensor:
        """All prompts, (K, N, H), detached."""
        return torch.stack([p.embedding.detach() for p in self.prompts])

    def load_stacked(self, values: Tensor) -> None:
        for i, v in enumerate(values):
            self.put(i, v)

    def put(self, i: int, value: Tensor) -> None:
        """Set prompt ``i`` to ``value`` (N, H) (a residual prompt: its mapped value)."""
        prompt = self.prompts[i]
        if isinstance(prompt, MAPPED):
            prompt.put(value)
        else:
            prompt.embedding.data.copy_(value)

    def plain(self) -> list[SoftPrompt]:
        """Each prompt as a plain ``SoftPrompt`` (a residual prompt: its mapped value)."""
        return [
            p if isinstance(p, SoftPrompt) else p.plain() if isinstance(p, ProjectedPrefix)
            else SoftPrompt(p.embedding.detach())
            for p in self.prompts
        ]  # fmt: skip


def prepend(
    virtual: Tensor,
    inputs_embeds: Tensor,
    attention_mask: Tensor,
    labels: Tensor | None = None,
    at: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Put each row's virtual tokens ``virtual`` (B, N, H) into its text (B, T, H): before it,
    or, with ``at`` (B,), before token ``at[i]`` of row i. Returns (B, N+T) embeds, mask and
    labels (no loss on the virtual tokens); rows stay right-padded."""
    b, n = inputs_embeds.shape[0], virtual.shape[1]
    virtual = virtual.to(inputs_embeds.dtype)
    if at is None or not bool(at.any()):
        embeds = torch.cat([virtual, inputs_embeds], dim=1)
        mask = torch.cat([attention_mask.new_ones(b, n), attention_mask], dim=1)
        if labels is not None:
            labels = torch.cat([labels.new_full((b, n), IGNORE_INDEX), labels], dim=1)
        return embeds, mask, labels
    t = inputs_embeds.shape[1]
    j = torch.arange(n + t, device=at.device).unsqueeze(0)  # (1, N+T) output positions
    start = at.unsqueeze(1)  # (B, 1)
    is_virtual = (j >= start) & (j < start + n)  # (B, N+T)
    src = torch.where(j < start, j, j - n).clamp(0, t - 1)  # the text token at each position
    text = inputs_embeds.gather(1, src.unsqueeze(-1).expand(-1, -1, inputs_embeds.shape[2]))
    rows = torch.arange(b, device=at.device).unsqueeze(1)
    placed = virtual[rows, (j - start).clamp(0, n - 1)]  # (B, N+T, H)
    embeds = torch.where(is_virtual.unsqueeze(-1), placed, text)
    mask = torch.where(is_virtual, 1, attention_mask.gather(1, src))
    if labels is not None:
        labels = torch.where(is_virtual, IGNORE_INDEX, labels.gather(1, src))
    return embeds, mask, labels


def rows_prompts(
    prompt: SoftPrompt | ResidualPrompt | PromptSet, batch: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """The distinct prompts a batch uses, (K, N, H), and each row's index into them, (B,).
    A ``PromptSet`` with ``dropout`` (training) gives each row its own dropped copy (K = B)."""
    ids = batch["input_ids"]
    if isinstance(prompt, PromptSet):
        present, which = torch.unique(batch["task"], return_inverse=True)
        virtual = torch.stack([prompt.prompts[i].embedding for i in present.tolist()])
        which = which.to(ids.device)
        if prompt.dropout > 0:
            virtual = F.dropout(virtual[which], prompt.dropout, training=True)
            which = torch.arange(ids.shape[0], device=ids.device)
        return virtual, which
    return prompt.embedding.unsqueeze(0), ids.new_zeros(ids.shape[0])


def before_input(model: nn.Module, prompt, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """What an encoder reads: the input embeddings with each row's prompt first (B, N+T, H)
    and the mask extended with ones (B, N+T); the batch as it is without a prompt."""
    embeds, mask = embed_tokens(model, batch["input_ids"]), batch["attention_mask"]
    if prompt is None:
        return embeds, mask
    virtual, which = rows_prompts(prompt, batch)
    embeds, mask, _ = prepend(virtual[which], embeds, mask)
    return embeds, mask


def embed_tokens(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Token ids -> the embeddings the model's first layer sees when given these ids: what
    the embedding layer returns (scaled for Gemma), times ``input_scale``."""
    embeds = model.get_input_embeddings()(input_ids)
    scale = input_scale(model)
    return embeds if scale == 1.0 else embeds * scale


_SCALES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def input_scale(model: nn.Module) -> float:
    """The factor by which the model's body multiplies embedded *ids* but not
    ``inputs_embeds`` (Pegasus, Marian and BlenderbotSmall encoders with scale_embedding:
    sqrt(d)), else 1.0. Checked once per model against its own forward: a body that scales
    both, or neither, gets 1.0."""
    if model not in _SCALES:
        encoder = getattr(model.config, "is_encoder_decoder", False)
        body = model.get_encoder() if encoder else model.base_model
        scale = getattr(body, "embed_scale", None)
        _SCALES[model] = 1.0
        if isinstance(scale, (int, float)) and scale != 1.0:
            ids = torch.arange(1, 5, device=model.get_input_embeddings().weight.device)[None]
            scaled = model.get_input_embeddings()(ids) * scale
            try:
                want = body(input_ids=ids).last_hidden_state
                got = body(inputs_embeds=scaled).last_hidden_state
            except (AttributeError, RuntimeError, TypeError, ValueError):
                return 1.0  # a body that cannot run alone: as the embedding layer returns
            if torch.allclose(got, want, atol=1e-5):
                _SCALES[model] = float(scale)
    return _SCALES[model]


def init_prompt(
    model: nn.Module,
    tokenizer,
    cfg: PromptConfig,
    seed: int = 0,
    task_text: str | None = None,
    shuffle: bool = False,
) -> SoftPrompt:
    """Build the starting prompt that ``cfg.init`` asks for (auto, random, text or vocab; a
    saved prompt's folder is read by ``softprompt.load_prompt``).

    ``auto`` uses ``task_text`` (the task's own words, see ``training.starting.task_words``) like
    ``text`` uses --init-text, and ``vocab`` when there is none. ``shuffle`` (ensemble members
    after the first) orders the words' tokens at random with ``seed`` before repeating them,
    so that members start apart."""
    n = cfg.num_virtual_tokens
    gen = torch.Generator().manual_seed(seed)
    if cfg.init == "auto":
        ids = tokenizer(task_text, add_special_tokens=False)["input_ids"] if task_text else []
        if not ids:
            return init_prompt(model, tokenizer, PromptConfig(n, init="vocab"), seed)
        if shuffle:
            ids = [ids[i] for i in torch.randperm(len(ids), generator=gen).tolist()]
        return SoftPrompt(_embed_ids(model, (ids * (n // len(ids) + 1))[:n]))
    if cfg.init == "random":
        ref = _embedding_sample(model, gen)
        return SoftPrompt(torch.randn(n, ref.shape[1], generator=gen) * ref.std())
    if cfg.init == "text":
        ids = tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError("--init-text gives no tokens; give a phrase describing the task")
        ids = (ids * (n // len(ids) + 1))[:n]  # repeat, then cut to N
        return SoftPrompt(_embed_ids(model, ids))
    if cfg.init == "vocab":
        pool = _common_token_ids(tokenizer, model)
        pick = pool[torch.randint(len(pool), (n,), generator=gen)]
        return SoftPrompt(_embed_ids(model, pick.tolist()))
    raise ConfigError(
        f"--init {cfg.init!r} is a saved prompt: load it with softprompt.load_prompt (training "
        "does this for you)"
    )


def words_used(tokenizer, text: str, n: int) -> str:
    """The part of ``text`` that fits ``n`` virtual tokens (the rest would be cut): says so
    when it is cut, so the run records only the words it started from."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= n:
        return text
    used = tokenizer.decode(ids[:n]).strip()
    warn(
        f"--init-text is {len(ids)} tokens, longer than the prompt's {n} virtual tokens: "
        f"only the first {n} are used ({used!r}); raise --num-virtual-tokens to use all"
    )
    return used


@torch.no_grad()
def _embed_ids(model: nn.Module, ids: list[int]) -> Tensor:
    weight = model.get_input_embeddings().weight
    return embed_tokens(model, torch.tensor(ids, device=weight.device)).float().cpu()


def _embedding_sample(model: nn.Module, gen: torch.Generator) -> Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    return _embed_ids(model, torch.randint(vocab, (1024,), generator=gen).tolist())


def _common_token_ids(tokenizer, model: nn.Module) -> Tensor:
    """The first ids that are not special tokens (BPE and SentencePiece vocabularies
    list frequent pieces first)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    special = set(tokenizer.all_special_ids)
    # Gemma reserves hundreds of unused/control ids near the start: skip what decodes to markup.
    ids = []
    for i in range(vocab):
        if i in special:
            continue
        piece = tokenizer.convert_ids_to_tokens(i)
        if piece is None or (piece.startswith("<") and piece.endswith(">")):
            continue
        ids.append(i)
        if len(ids) == VOCAB_INIT_POOL:
            break
    return torch.tensor(ids)


def max_positions(model) -> int | None:
    """The longest sequence the model's position embeddings hold (None: no such limit);
    RoBERTa's and its copies' positions start after the padding id, so their table of 514
    holds 512."""
    names = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length")
    found = [getattr(model.config, name, None) for name in names]
    value = next((v for v in found if isinstance(v, int) and v > 0), None)
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    offset = getattr(embeddings, "padding_idx", None)
    table = getattr(embeddings, "position_embeddings", None)
    if value is not None and isinstance(offset, int) and isinstance(table, nn.Embedding):
        value = min(value, table.num_embeddings - offset - 1)
    return value


# Prompts trained through a mapping (extra parameters, checkpointed with the run)
MAPPED = (ResidualPrompt, ProjectedPrefix)
