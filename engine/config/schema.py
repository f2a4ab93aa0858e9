"""The run config's schema: one typed section per concern (model, data, forget, method, backend, ...), every
field with its help (``description``) and its range; unknown keys are errors (``StrictModel``). Rules between
sections live in rules.py, reading and overrides in loading.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from engine.config.rules import ALIASES, check_sections
from engine.config.shipped import resolve_shipped
from engine.methods import ErmConfig, MethodConfig, ScrubConfig
from engine.models.lora import LoraSettings
from engine.settings import StrictModel


class ModelConfig(StrictModel):
    # which key the user gave ``path`` by: model.base when `unlearn train` reads it in place of path (for errors)
    _path_key: str = PrivateAttr("model.path")

    path: str | None = Field(
        None,
        description="Checkpoint to start from: a local Hugging Face folder or a hub id. Required by `run` and `eval`.",
    )
    base: str | None = Field(
        None,
        description="The checkpoint `unlearn train` fine-tunes (a hub id or a local folder); set, `train` reads it "
        "in place of path, which then names the trained model `run` and `eval` read (one config for both).",
    )
    arch: Literal["preact_resnet18", "allcnn"] | None = Field(
        None,
        description="Architecture `train` builds from scratch (when set, `train` ignores path; otherwise it fine-tunes path).",
    )
    width: float = Field(1.0, gt=0, description="Width multiplier of the from-scratch architecture.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of `path`.")
    trust_remote_code: bool = Field(
        False, description="Allow a checkpoint's own Python code. Off unless asked for."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights' dtype for causal LMs (float32 on CPU; bfloat16 on recent GPUs)."
    )
    lora: LoraSettings | None = Field(
        None,
        description="Unlearn with a LoRA student (`run`): {rank, alpha, dropout, target_modules, merge}.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in backward instead of keeping them (causal LMs): less memory.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa",
        description="Causal LMs' attention kernel: sdpa (torch's), eager, or flash_attention_2 (needs the "
        "flash-attn package and a GPU).",
    )


class DataConfig(StrictModel):
    preset: Literal["tofu", "muse"] | None = Field(
        None,
        description="A dataset with its own evaluation suite: tofu (task=causal_lm; settings in the tofu section), "
        "muse (task=causal_lm; news or books articles, settings in the muse section). "
        "None: `dataset` below (images and labels, or text with the columns named below).",
    )
    dataset: str = Field(
        "uoft-cs/cifar10",
        description="Local folder/file (parquet, json, csv, or a `datasets.save_to_disk` folder) or a hub dataset id "
        "(read from a copy under UNLEARN_DATA_MIRROR when there is one).",
    )
    train_split: str = Field(
        "train", description="Split holding the training data (forget + retain + validation)."
    )
    test_split: str = Field("test", description="Split used as the test set.")
    text_column: str | None = Field(
        None,
        description="causal_lm: a column of raw documents (loss on every token; a document longer than max_length "
        "is cut into windows, each an example with the id ROW_ID:WINDOW).",
    )
    prompt_column: str | None = Field(
        None,
        description="causal_lm: the prompt (question) column of prompt/answer pairs (loss on the answer only).",
    )
    answer_column: str | None = Field(
        None, description="causal_lm: the answer column of prompt/answer pairs."
    )
    max_length: int = Field(
        256, ge=8, description="causal_lm: tokens per example (a document's window; prompt + answer, cut)."
    )
    chat_template: Literal["auto", "on", "off"] = Field(
        "auto",
        description="causal_lm prompt/answer pairs: format prompts with the tokenizer's chat template.",
    )
    image_column: str | None = Field(None, description="Image column; detected from the features when empty.")
    label_column: str | None = Field(None, description="Label column; detected (a ClassLabel) when empty.")
    id_column: str | None = Field(
        None, description="Column of stable example ids; the row index in the train split when empty."
    )
    classes: list[int] | None = Field(
        None, description="Keep only these label indices (remapped to 0..K-1 in this order)."
    )
    max_per_class: int | None = Field(
        None, ge=1, description="Keep the first N train rows of each class (CPU-sized runs)."
    )
    max_test_per_class: int | None = Field(
        None, ge=1, description="Keep the first N test rows of each class."
    )
    val_fraction: float = Field(
        0.2, ge=0, lt=1, description="Fraction of each class's train rows held out as validation."
    )
    split_seed: int = Field(0, description="Seed of the per-class validation hold-out.")
    image_size: int | None = Field(
        None, ge=1, description="Resize images to this square size (None: keep the dataset's size)."
    )
    mean: list[float] = Field(
        default_factory=lambda: [0.4914, 0.4822, 0.4465],
        description="Normalisation mean for models without an image processor.",
    )
    std: list[float] = Field(
        default_factory=lambda: [0.2470, 0.2435, 0.2616],
        description="Normalisation std for models without an image processor.",
    )


class TofuConfig(StrictModel):
    """TOFU (Maini et al. 2024): question-answer pairs about 200 fictitious authors (task=causal_lm with
    data.preset=tofu): the dataset preset and evaluation suite of causal LMs."""

    dataset: str = Field(
        "locuslab/TOFU",
        description="The hub id locuslab/TOFU (read from UNLEARN_DATA_MIRROR/tofu when that copy exists) or a local "
        "folder of <split>.jsonl files laid out as the hub.",
    )
    forget_split: Literal["forget01", "forget05", "forget10"] = Field(
        "forget10", description="Which TOFU forget set (1, 5 or 10% of the authors, TOFU's last ones)."
    )
    num_authors: int | None = Field(
        None,
        ge=2,
        le=200,
        description="Keep N authors (CPU-sized runs): the first round(N*fraction) authors of the forget split "
        "are forgotten, the first N-k authors of TOFU are retained. None: all 200.",
    )
    max_length: int = Field(256, ge=8, description="Token limit of prompt + answer (longer answers are cut).")
    chat_template: Literal["auto", "on", "off"] = Field(
        "auto", description="Format questions with the tokenizer's chat template: auto = when it has one."
    )
    utility_examples: int | None = Field(
        None, ge=1, description="Evaluate model utility on at most this many examples per set (None: all)."
    )
    max_new_tokens: int = Field(64, ge=1, description="Greedy generation limit for ROUGE.")


class MuseConfig(StrictModel):
    """MUSE (Shi et al. 2024): news articles (MUSE-News) or books (MUSE-Books) unlearned as raw documents, scored by
    MUSE's own evaluation sets (task=causal_lm with data.preset=muse; engine/data/muse.py, engine/eval/muse.py)."""

    corpus: Literal["news", "books"] = Field(
        "news", description="Which MUSE corpus: news (muse-bench/MUSE-News) or books (muse-bench/MUSE-Books)."
    )
    path: str | None = Field(
        None,
        description="A hub id or a local folder laid out as the MUSE authors' (<subset>/<split>.json); None: the "
        "corpus's hub id, read from UNLEARN_DATA_MIRROR/muse-news (muse-books) when that copy exists.",
    )
    revision: str | None = Field(
        None, description="Hub revision to read the corpus at; None: the one engine/data/muse.py pins."
    )
    forget_subset: int | None = Field(
        None,
        ge=1,
        description="Forget only the first N articles of raw/forget (small runs); None: all of them. The "
        "evaluation rows drawn from forget articles are then those of the kept articles.",
    )
    retain_subset: int | None = Field(
        None, ge=1, description="Train on only the first N retain articles (small runs); None: all of them."
    )
    max_length: int = Field(
        256,
        ge=8,
        description="Tokens per training example: a longer article is cut into windows of this many.",
    )
    max_rows: int | None = Field(
        None,
        ge=1,
        description="Score at most this many rows of each evaluation set (verbmem, knowmem, privleak); None: all.",
    )
    max_prompt_tokens: int | None = Field(
        None,
        ge=8,
        description="Keep only the last N tokens of a verbmem or knowmem prompt (CPU-sized runs); None: all of it.",
    )
    verbmem_max_new_tokens: int = Field(
        128, ge=1, description="C1: greedy tokens generated after each verbmem prompt (MUSE: 128)."
    )
    knowmem_max_new_tokens: int = Field(
        32, ge=1, description="C2/C4: greedy tokens generated for each knowmem answer (MUSE: 32)."
    )


class ForgetConfig(StrictModel):
    kind: Literal["class", "selective", "random", "ids", "where", "dataset"] = Field(
        "class",
        description="class: every train example of `label`; selective: `count` examples of `label`; "
        "random: a `fraction` of the train set; ids: the explicit `ids` / `ids_file`; where (text): every row "
        "matching `where`; dataset (text): the rows of `dataset`, a corpus apart from the training data. "
        "TOFU: class = the tofu.forget_split authors, or ids.",
    )
    where: dict[str, Any] | None = Field(
        None,
        description="where: column -> value (a list: any of them); a row is forgotten when every column matches, "
        "e.g. {author: Jane Doe}.",
    )
    dataset: str | None = Field(
        None,
        description="dataset: a file, folder or hub id holding the forget rows (its train split), with the "
        "training data's columns; the training data is then all retained.",
    )
    label: int | str | None = Field(
        None, description="Class index (after `data.classes` remapping) or class name."
    )
    count: int | None = Field(None, ge=1, description="selective: number of examples of `label` to forget.")
    fraction: float | None = Field(
        None, gt=0, lt=1, description="random: fraction of the train set to forget."
    )
    ids: list[int | str] | None = Field(None, description="ids: example ids to forget.")
    ids_file: str | None = Field(None, description="ids: a file with one id per line (or a JSON list).")
    retain_ids: list[int | str] | None = Field(
        None,
        description="ids: example ids to retain; when given (or `retain_ids_file`), D_r is exactly these "
        "instead of every training example not forgotten.",
    )
    retain_ids_file: str | None = Field(
        None, description="ids: a file of retain ids, one per line (or a JSON list)."
    )
    earlier_ids: list[int | str] | None = Field(
        None,
        description="ids: example ids forgotten by earlier model versions (`unlearn request process` sets it): "
        "in neither the forget nor the retain set, so no forgotten example is ever trained on again "
        "(image_classification, and causal_lm: TOFU and any text data).",
    )
    seed: int = Field(0, description="Seed of the selective / random draw.")

    @model_validator(mode="after")
    def _retain_ids_need_kind_ids(self) -> ForgetConfig:
        if self.kind != "ids" and self.earlier_ids:
            raise ValueError(f"forget.earlier_ids needs forget.kind=ids (it is {self.kind!r})")
        if self.kind != "ids" and (self.retain_ids is not None or self.retain_ids_file is not None):
            raise ValueError(
                f"forget.retain_ids / forget.retain_ids_file need forget.kind=ids (it is {self.kind!r}): "
                "set forget.kind=ids with forget.ids, or drop the retain ids"
            )
        return self


class HoldoutConfig(StrictModel):
    """causal_lm text data: rows the model never saw, the non-members of the membership attacks."""

    dataset: str | None = Field(
        None,
        description="A file, folder or hub id (its train split) with the training data's columns; None: no "
        "holdout (no MIA, privleak or holdout NLL; SCRUB+R needs one).",
    )


class EvalConfig(StrictModel):
    batch_size: int = Field(256, ge=1, description="Batch size of evaluation forwards.")
    reference: str | None = Field(
        None, description="Retrain checkpoint to report side by side (and for SCRUB+R's comparison)."
    )
    every_epoch: bool = Field(
        True, description="Evaluate forget/retain/test/val after every epoch (plots, SCRUB+R)."
    )
    mia_seed: int = Field(0, description="Seed of the membership attacks' subsampling and splits.")
    max_rows: int | None = Field(
        256, ge=1, description="causal_lm text data: score at most this many rows of each set (None: all)."
    )
    max_new_tokens: int = Field(
        32, ge=1, description="causal_lm text data: greedy tokens of the verbatim continuation (at most)."
    )


class AuditConfig(StrictModel):
    """`unlearn audit`: K unlearnings and K retrained references from different seeds, scored per forget
    example as the NeurIPS 2023 Machine Unlearning Challenge does (docs/evaluation.md, "The challenge audit")."""

    k: int = Field(
        8, ge=2, description="Models per side: K unlearnings of model.path and K retrained references."
    )
    seed: int = Field(1, description="Seed of the first model of each side; model i uses seed + i.")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the per-example (epsilon, delta) estimate.")
    lira: bool = Field(
        True,
        description="Also train K models on D (with the forget set) for the LiRA attack (Gaussian fits of the "
        "logit-scaled confidence with and without each forget example); needs k >= 3 (leave-one-out fits).",
    )
    cache_dir: str | None = Field(
        None,
        description="Where trained references are kept and reused by later audits of the same data, forget set "
        "and recipe (any method); None: audit_references/ beside model.path.",
    )
    two_sided: bool = Field(
        False,
        description="Also try the reversed threshold rules (catches over-forgetting: confidence below "
        "retraining's). False: the challenge's one-sided attack family, comparable with its leaderboard.",
    )
    worst: int = Field(
        10, ge=1, description="How many forget examples with the largest epsilon to list by id."
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs each Ray task reserves (one model is one task).")
    ray_address: str | None = Field(
        None, description="Ray cluster for the tasks; None: RAY_ADDRESS if set, else an embedded local Ray."
    )


class LoggingConfig(StrictModel):
    progress: bool = Field(True, description="Show progress bars.")
    wandb: bool = Field(False, description="Log to Weights & Biases.")
    wandb_project: str = Field("unlearning", description="W&B project.")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="offline works without a network; sync later."
    )


class BackendConfig(StrictModel):
    name: Literal["single", "deepspeed", "ray"] = Field(
        "single",
        description="Where the loop runs: single = one process (the embedded default); deepspeed = DeepSpeed "
        "ZeRO over the processes a launcher started (deepspeed, torchrun, srun; one process without one); "
        "ray = Ray Train workers (DeepSpeed inside each) fed by Ray Data, on a cluster or an embedded local Ray.",
    )
    device: str = Field("auto", description="single: auto (cuda if available), cpu, cuda, cuda:N.")
    num_threads: int | None = Field(
        None, ge=1, description="torch.set_num_threads per process (1 is fastest for small CPU models)."
    )
    gradient_accumulation_steps: int = Field(
        1,
        ge=1,
        description="Micro-batches per optimizer step on each process. The global batch of every phase stays the "
        "method's batch size whatever the number of processes and steps.",
    )
    deepspeed_config: str = Field(
        "configs/deepspeed/zero2.json",
        description="deepspeed: the DeepSpeed JSON (ZeRO section), a path or a shipped one's name (zero0-zero3, "
        "zero3_offload: `unlearn configs`); the keys below override it. No optimizer or scheduler section: those "
        "come from the method.",
        validate_default=True,  # the default names configs/, which a pip install does not have in its cwd
    )
    zero_stage: Literal[0, 1, 2, 3] | None = Field(
        None, description="deepspeed: ZeRO stage, overriding the JSON's (3 also shards the frozen teacher)."
    )
    dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Training precision. deepspeed: DeepSpeed's bf16/fp16 sections (master weights fp32); single: "
        "forwards under torch.autocast in that dtype (weights and optimizer fp32).",
    )
    offload_optimizer: Literal["none", "cpu", "nvme"] = Field(
        "none", description="deepspeed: optimizer state offload (ZeRO 1-3; runs DeepSpeed's CPU Adam)."
    )
    offload_param: Literal["none", "cpu", "nvme"] = Field(
        "none", description="deepspeed: parameter offload (ZeRO-3 only)."
    )
    nvme_path: str | None = Field(
        None, description="deepspeed: folder on a fast local disk for nvme offload."
    )
    dist_backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="deepspeed: collective backend; auto = nccl with GPUs, gloo on CPU."
    )
    timeout_s: int = Field(
        600, ge=10, description="deepspeed: seconds a collective waits for the other ranks before failing."
    )
    ray_address: str | None = Field(
        None,
        description="ray: the cluster to join (ray.init(address=...)); None: RAY_ADDRESS if set, else an embedded "
        "local Ray on 127.0.0.1.",
    )
    num_workers: int = Field(
        2, ge=1, description="ray: Ray Train workers (one process each, one GPU each with use_gpu)."
    )
    use_gpu: bool = Field(
        False, description="ray: give each worker a GPU (nccl); false: CPU workers over gloo."
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="ray: CPUs reserved per worker.")
    max_failures: int = Field(
        0,
        ge=0,
        description="ray: worker-group restarts after a failure; each resumes from the last checkpoint.",
    )
    storage_path: str | None = Field(
        None,
        description="ray: Ray Train's storage (reported checkpoints, results); None: OUTPUT_DIR.ray beside it.",
    )
    keep_checkpoints: bool = Field(
        False,
        description="Keep every epoch's resumable checkpoint in OUTPUT/checkpoints (default: only the last, "
        "and none once the run has completed).",
    )

    @field_validator("deepspeed_config")
    @classmethod
    def _shipped_json(cls, value: str) -> str:
        # a name or configs/deepspeed/NAME.json that is not a file here: the shipped JSON (a pip install has no
        # configs/ folder); anything else is left for the backend to refuse with its own message
        found = resolve_shipped(value, "deepspeed")
        return str(found) if found is not None and not Path(value).is_file() else value

    sync_batchnorm: bool = Field(
        False,
        description="deepspeed/ray on GPUs: BatchNorm layers as torch.nn.SyncBatchNorm, statistics over the "
        "global batch (default: each rank's own, as DDP keeps them; the export is rank 0's).",
    )


class CheckpointConfig(StrictModel):
    """Resumable checkpoints (engine/checkpoint/store.py) and the divergence guard."""

    on_invalid: Literal["error", "previous", "weights"] = Field(
        "error",
        description="When the newest checkpoint is damaged or does not match this run (world size, ZeRO stage): "
        "error (stop, naming the file or field), previous (resume from the previous good checkpoint), weights "
        "(keep its weights, start a fresh optimizer). What was done is recorded in the report.",
    )
    keep: int = Field(
        2, ge=2, description="Complete checkpoints kept during a run (2: the newest and one to fall back to)."
    )
    max_abs_loss: float | None = Field(
        1e4,
        gt=0,
        description="Divergence guard: a step whose global |loss| exceeds this (or is not finite) stops the run "
        "before it is applied (exit status 3); null: only non-finite losses stop it.",
    )


class OutputConfig(StrictModel):
    """Where a completed run's model goes besides output_dir."""

    push_to_hub: str | None = Field(
        None,
        description="A hub repository id (user/name) to upload the unlearned model folder to, with its model card "
        "and receipt, once the run has completed (needs a token: `hf auth login` or HF_TOKEN).",
    )
    private: bool = Field(True, description="push_to_hub: create the repository as private.")


class LedgerConfig(StrictModel):
    """Deletion requests as a stream (`unlearn request add | list | process`, engine/recipes/request.py): the
    versions v1, v2, ... are folders inside output_dir, the ledger a SQLite file beside them."""

    path: str | None = Field(
        None,
        description="The SQLite ledger of deletion requests and model versions (null: OUTPUT_DIR/ledger.sqlite, "
        "next to the version folders).",
    )
    retrain_every: int | None = Field(
        None,
        ge=1,
        description="Serve every N-th version by retraining from scratch (method=retrain, the train section's "
        "recipe) on the cumulative retain set instead of unlearning; null: always unlearn.",
    )
    retrain_bound: float | None = Field(
        None,
        ge=0,
        description="Audit drift bound, in points of error (image_classification): when an unlearned version's "
        "error on every example forgotten so far differs from the error unseen examples of the same classes have "
        "(report.json forgotten_error vs forgotten_val_error) by more than this, the batch is served by "
        "retraining instead and the unlearned candidate is discarded; null: no bound.",
    )


class RunConfig(StrictModel):
    task: Literal["image_classification", "causal_lm"] = Field(
        "image_classification",
        description="image_classification: any AutoModelForImageClassification checkpoint or the paper's CIFAR "
        "nets (data/forget sections); causal_lm: any AutoModelForCausalLM checkpoint (data.preset=tofu: the tofu "
        "section). The earlier names vision and tofu are read as these.",
    )
    seed: int = Field(0, description="Seed of initialisation, data order and augmentation.")
    output_dir: str = Field(
        "runs/default",
        description="Where results go. Must be empty or absent unless overwrite=true. `{command}` in it becomes "
        "the command (train, run, eval, audit), so one config gives each command its own folder.",
    )
    overwrite: bool = Field(
        False, description="Replace an existing output_dir (only once the new run has completed)."
    )
    output: OutputConfig = Field(default_factory=OutputConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    forget: ForgetConfig = Field(default_factory=ForgetConfig)
    holdout: HoldoutConfig = Field(default_factory=HoldoutConfig)
    tofu: TofuConfig = Field(default_factory=TofuConfig)
    muse: MuseConfig = Field(default_factory=MuseConfig)
    method: Annotated[
        MethodConfig,
        Field(discriminator="name"),
    ] = Field(default_factory=ScrubConfig, description="The unlearning method of `run`.")
    train: ErmConfig = Field(
        default_factory=ErmConfig, description="The recipe of `train` (Original and Retrain)."
    )
    eval: EvalConfig = Field(default_factory=EvalConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    backend: BackendConfig = Field(default_factory=BackendConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)

    @field_validator("task", mode="before")
    @classmethod
    def _earlier_task_names(cls, value):
        return ALIASES.get(value, value)

    @model_validator(mode="before")
    @classmethod
    def _tofu_is_a_preset(cls, data):
        # `task: tofu` (earlier configs) = task causal_lm with the TOFU preset
        if isinstance(data, dict) and data.get("task") == "tofu":
            section = data.get("data")
            data = {**data, "data": {**(section if isinstance(section, dict) else {}), "preset": "tofu"}}
        return data

    @model_validator(mode="after")
    def _sections_fit(self) -> RunConfig:
        check_sections(self)  # rules.py: a method the task cannot serve, data the task cannot read, ...
        return self
