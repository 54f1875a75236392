"""torchtitan's own llama3, at RAT+ flavor shapes, on our data pipeline: the throughput baseline.

``--experimental.custom_import bench.llama3_same_shape`` registers the train spec
``llama3_same_shape`` with flavors ``1B``, ``3B``, ``7B`` (and ``llama3_8B``, torchtitan's own 8B): the same width, depth and
heads as our flavors, full multi-head attention (no GQA), LLaMA-2 vocab, and a SwiGLU
FFN whose hidden size (8/3 d, rounded to 256) gives the same FFN parameters and FLOPs
as RAT+'s 4d GELU FFN (3 x 8/3 d^2 = 2 x 4 d^2).
"""

import dataclasses

from torchtitan.models.llama3 import TransformerModelArgs, get_train_spec, llama3_args
from torchtitan.protocols.train_spec import get_train_spec as registered
from torchtitan.protocols.train_spec import register_train_spec

import ratplus_titan  # noqa: F401
from ratplus_titan.data.dataset import build_dataloader
from ratplus_titan.data.tokenizer import build_tokenizer
from ratplus_titan.model import ratplus_flavors

NAME = "llama3_same_shape"


def same_shape(flavor: str) -> TransformerModelArgs:
    args = ratplus_flavors[flavor]
    return TransformerModelArgs(
        dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_heads,
        vocab_size=args.vocab_size, multiple_of=256, rope_theta=args.rope_theta, max_seq_len=args.max_seq_len,
    )  # fmt: skip


try:
    registered(NAME)
except ValueError:
    register_train_spec(
        NAME,
        dataclasses.replace(
            get_train_spec(),
            # plus torchtitan's own Llama 3 8B (GQA, SwiGLU 14336, its 128K vocab), the 7B comparison
            model_args={**{flavor: same_shape(flavor) for flavor in ("1B", "3B", "7B")}, "llama3_8B": llama3_args["8B"]},
            build_dataloader_fn=build_dataloader,
            build_tokenizer_fn=build_tokenizer,
            build_validator_fn=None,
            state_dict_adapter=None,
        ),
    )
