"""What the reproduction trains and measures: the three models and the sizes it runs at."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Model:
    """One pretrained model of the comparison (DESIGN §3: RAT+ and the attention baselines)."""

    name: str
    label: str  # for tables and plots
    apply_re: bool  # False: no recurrence (keys and values are k, x directly)
    joint_train: bool  # a D=joint_dilation step before the dense step of every batch


MODELS: dict[str, Model] = {m.name: m for m in (
    Model("ratplus", "RAT+", apply_re=True, joint_train=True),
    Model("attention", "attention", apply_re=False, joint_train=False),  # the paper's standard baseline
    Model("attention_joint", "attention + joint", apply_re=False, joint_train=True),  # FLOPs-matched to RAT+
)}  # fmt: skip


@dataclass(frozen=True)
class Scale:
    """One size of the reproduction: model, data, the patterns measured and each stage's schedule.

    ``batch`` is the global batch (windows or samples a step); ``micro_batch`` what one forward holds
    (``batch // micro_batch`` gradient-accumulation steps), so several runs share one GPU.
    """

    flavor: str
    seq_len: int
    batch: int
    micro_batch: int  # pretraining
    short_micro_batch: int  # adaptation and fine-tuning: runs that share the GPU six or nine at a time
    pretrain_steps: int
    warmup_steps: int
    adapt_steps: int
    sft_steps: int
    patterns: tuple[str, ...]  # the sparse patterns adapted to, fine-tuned under and evaluated
    corpus: tuple[str, str]  # (train, validation) text files, relative to the repository
    eval_windows: int  # held-out windows for the LM loss
    eval_batch: int
    recall_windows: int  # repeated-random-token windows (exact recall at distance seq_len / 2)
    niah_tasks: tuple[str, ...]
    niah_train_samples: int  # SFT samples from training books, all tasks together (sft_steps x batch: epochs)
    niah_eval_samples: int  # evaluation samples per task, from held-out books
    log_freq: int
    joint_dilation: int = 64
    adapt_holdout_steps: int = 0  # windows kept from pretraining for adaptation, in steps (at least adapt_steps):
    # a larger value lets runs with different adapt_steps share one pretraining (copies of a work folder)
    pretrain_lr: float = 1.5e-3
    adapt_lr: float = 8e-5  # DESIGN §3
    sft_lr: float = 1e-4
    sft_warmup_steps: int = 0
    compile_pretrain: bool = True
    compile_short: bool = False  # adaptation and SFT: short runs, where compiling costs more than it saves
    checkpoint_interval: int = 100  # a run cut off resumes from its last checkpoint
    seed: int = 0  # data order and NIAH samples
    repeat_share: float = 0.0  # training windows that repeat their beginning beyond the window (repeats.py)
    models: tuple[str, ...] = tuple(MODELS)  # which of MODELS to train
    sparse_runs: bool = True  # adapt to and fine-tune under each sparse pattern (False: dense fine-tuning only)
    niah: bool = True  # NIAH fine-tuning and evaluation (False: the language-model stages alone)
    extra: tuple[str, ...] = field(default=())  # more torchtitan arguments for every run
    short_run_gib: float = 14.0
    """GPU memory one adaptation or fine-tuning run is given when choosing how many run side by side. The 50M
    flavor at micro-batch 8 took 12.4-12.7 GiB each on the H100 (round 3), where 7 side by side (sized at
    10 GiB) ran out of its 79 GiB; 14 leaves room: 5 on an H100, 9 on an H200."""

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len


SCALES = {
    # one H100/H200, two device calls of 10 min (rerun continues): 3 pretrained models, 6 adaptations, 9 fine-tunings,
    # all evaluations
    "50m": Scale(
        # round 4: round 3's 320 steps of 32 windows formed no copying circuit; 3000 steps of 8 (49M tokens, about
        # 1.2 passes) and half the windows repeated, as copying formed only after 1.5-4K steps at toy size
        # (bench/induction.py); adaptation and fine-tuning keep their tokens and samples in 4x the steps
        flavor="50M", seq_len=2048, batch=8, micro_batch=8, short_micro_batch=8, pretrain_steps=3000, warmup_steps=150,
        adapt_steps=160, sft_steps=480, patterns=("d16w256s4", "d64w256s4"),
        corpus=("data/gutenberg/train.jsonl.xz", "data/gutenberg/validation.jsonl.xz"),
        eval_windows=128, eval_batch=16, recall_windows=32, niah_tasks=("single", "multikey"), niah_train_samples=1920,
        niah_eval_samples=200, log_freq=50, repeat_share=0.5, checkpoint_interval=250,
    ),
    "tiny": Scale(
        flavor="debugmodel", seq_len=256, batch=4, micro_batch=4, short_micro_batch=4, pretrain_steps=4, warmup_steps=1,
        adapt_steps=2, sft_steps=2, patterns=("d4w16s2", "d16w16s2"),
        corpus=("ratplus_titan/assets/corpus/en_pd_ccby.train.jsonl.gz",
                "ratplus_titan/assets/corpus/en_pd_ccby.validation.jsonl.gz"),
        eval_windows=4, eval_batch=4, recall_windows=2, niah_tasks=("single", "multikey"), niah_train_samples=8, niah_eval_samples=2,
        log_freq=1, compile_pretrain=False, checkpoint_interval=2,
        extra=("--training.mixed_precision_param", "float32"), short_run_gib=2.0,  # the debug model: well under 1 GiB
    ),
}  # fmt: skip
