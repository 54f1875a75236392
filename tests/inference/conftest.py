import pytest
import torch

from ratplus_titan.adapters.layout import save_export
from ratplus_titan.data.tokenizer import DEFAULT_TOKENIZER
from ratplus_titan.model.args import RATPlusModelArgs
from ratplus_titan.model.model import RATPlusModel


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and far faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A tiny model with the LLaMA-2 tokenizer (vocab 32000), adapted for d4w8s2."""
    torch.manual_seed(0)
    args = RATPlusModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=32000, max_seq_len=64, dilation=4, local_window=8, sinks=2)
    model = RATPlusModel(args)
    model.init_weights()
    out = tmp_path_factory.mktemp("export")
    save_export(out, model.state_dict(), args, dtype="float32", tokenizer_path=DEFAULT_TOKENIZER)
    return out
