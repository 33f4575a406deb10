import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Tiny models run fastest on one thread; more threads only contend on a 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    """A tiny Janus with the toy tokenizer and an untrained VQ (enough for sampler/log-prob tests)."""
    import data
    import unigrpo
    from transformers import JanusVQVAE
    torch.manual_seed(0)
    tok = data.build_text_tokenizer()
    cfg = unigrpo.get_config([])
    vq = JanusVQVAE(data.make_vq_config(cfg.image_size, cfg.patch_size, cfg.codebook_size, cfg.n_embd))
    model = unigrpo.UnifiedModel(unigrpo.tiny_janus(tok, vq, cfg), tok).eval()
    return model
