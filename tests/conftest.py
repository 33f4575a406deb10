import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# One torch thread per test process, and (through the environment) per unigrpo.py / torchrun / notebook kernel a
# test starts: pytest.ini runs one worker per core, so a second thread would only contend with the other worker.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def bias_text_logits(model, **bias):
    """Shift some text logits (e.g. make <begin_of_image> likely) without touching the weights;
    `del model.text_logits` undoes it."""
    b = torch.zeros(len(model.tokenizer), device=model.device)
    for name, v in bias.items():
        b[getattr(model, name)] = v
    model.text_logits = lambda h, f=type(model).text_logits: f(model, h) + b


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
