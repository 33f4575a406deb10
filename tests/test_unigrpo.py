"""The unified model wrapper, the interleaved sampler, teacher-forced log-probs, checkpoints, the CLI."""
import contextlib
import os
import random
import subprocess
import sys

import pytest
import torch

import data
import unigrpo
from conftest import bias_text_logits
from unigrpo import decode_rollout, make_batch, sample_interleaved, sequence_logprobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _prompts():
    ex = data.make_examples("continuation", 3, "rl", seed=0) + data.make_examples("story", 3, "rl", seed=0)
    return [e.prompt for e in ex]


@pytest.fixture
def boi_biased(tiny):
    """Raise the <begin_of_image> logit so rows open images at random, different times."""
    bias_text_logits(tiny, boi_id=2.5)
    yield tiny
    del tiny.text_logits


@pytest.mark.parametrize("temperature,cfg_scale", [(1.0, 1.0), (0.7, 1.0), (0.7, 3.0)])
def test_sampler_logprobs_equal_teacher_forced(boi_biased, temperature, cfg_scale):
    m = boi_biased
    g = torch.Generator().manual_seed(1)
    ro = sample_interleaved(m, _prompts() * 2, temperature=temperature, max_new_tokens=60, generator=g, cfg_scale=cfg_scale)
    assert ro.context[0], "continuation prompts carry context images through the understanding path"
    img = ro.is_image & ro.mask.bool()
    txt = ~ro.is_image & ro.mask.bool()
    assert img.sum() > 20 and txt.sum() > 20, "both modalities must be exercised"
    assert (img.sum(1) > m.n_image_tokens).any(), "some row draws an image after an earlier one (context for guidance)"
    logp, _ = sequence_logprobs(m, ro, temperature, cfg_scale=cfg_scale)
    torch.testing.assert_close(logp[img], ro.logp[img], atol=2e-5, rtol=0)  # measured: below 1e-6, with CFG 3 too
    torch.testing.assert_close(logp[txt], ro.logp[txt], atol=2e-5, rtol=0)
    # so the first GRPO ratio on-policy is exactly 1 (up to float error)
    ratio = torch.exp(logp - ro.logp)[ro.mask.bool()]
    assert (ratio - 1).abs().max() < 1e-4
    if cfg_scale != 1:  # guidance changes the image distribution only
        unguided, _ = sequence_logprobs(m, ro, temperature)
        assert (unguided - logp)[img].abs().max() > 1e-2
        assert torch.equal(unguided[txt], logp[txt])


def test_image_paths_start_at_fan_in_init(tiny):
    """tiny_janus re-initialises the image paths (data.fan_in_init): at HF's N(0, 0.02) a drawn image's tokens
    entered the trunk ~200x fainter than words, and the warm-up learnt images late or never (README)."""
    rms = lambda x: x.pow(2).mean().sqrt()
    with torch.no_grad():
        words = rms(tiny.janus.get_input_embeddings()(torch.arange(20)))
        codes = rms(tiny.janus.prepare_embeddings_for_image_generation(torch.arange(9)[None]))
    assert codes > words
    for layer in (tiny.janus.model.aligner.fc1, tiny.janus.model.generation_head.vision_head):
        w, bound = layer.weight, 1 / layer.weight.shape[1] ** 0.5  # Linear's default: uniform(-bound, bound)
        assert w.abs().max() <= bound and w.std() > 0.8 * bound / 3 ** 0.5


def test_begin_of_image_hidden_state_predicts_image_token_0(tiny):
    ex = data.make_examples("story", 1, "rl", seed=0)[0]
    b = make_batch(tiny, [ex])
    logp, _ = sequence_logprobs(tiny, b)
    ids = torch.cat([b.prompt_ids, b.ids], 1)
    is_img = torch.cat([torch.zeros_like(b.prompt_ids, dtype=torch.bool), b.is_image], 1)
    P = b.prompt_ids.shape[1]
    h = tiny.trunk(tiny.embed(ids, is_img), torch.ones_like(ids), torch.arange(ids.shape[1])[None])
    boi = int((b.ids[0] == tiny.boi_id).nonzero()[0])      # position of <begin_of_image> in the answer
    code0 = b.ids[0, boi + 1]
    expect = torch.log_softmax(tiny.image_logits(h[0, P + boi]), -1)[code0]
    wrong = torch.log_softmax(tiny.image_logits(h[0, P + boi + 1]), -1)[code0]  # the off-by-one
    assert b.is_image[0, boi + 1] and not b.is_image[0, boi]
    assert logp[0, boi + 1].item() == pytest.approx(expect.item(), abs=1e-5)
    assert abs(logp[0, boi + 1].item() - wrong.item()) > 1e-3


def test_packed_rows_score_as_each_row_alone(tiny, monkeypatch):
    """sequence_logprobs packs each row's prompt and answer from column 0. A batch whose rows pair long prompts
    (continuations, with context images) with short answers and short prompts with long answers scores every
    row as that row does alone, without padding; and the trunk sees the longest row, not max prompt + max answer."""
    ex = (data.make_examples("continuation", 2, "rl", seed=1) + data.make_examples("story", 2, "rl", seed=1)
          + data.make_examples("understanding", 2, "rl", seed=1))
    b = make_batch(tiny, ex)
    widths, trunk = [], tiny.trunk
    monkeypatch.setattr(tiny, "trunk", lambda embeds, *a, **k: widths.append(embeds.shape[1]) or trunk(embeds, *a, **k))
    with torch.no_grad():
        logp, _ = sequence_logprobs(tiny, b)
        for i, e in enumerate(ex):
            alone, _ = sequence_logprobs(tiny, make_batch(tiny, [e]))
            n = alone.shape[1]
            torch.testing.assert_close(logp[i, :n][b.mask[i, :n].bool()], alone[0][b.mask[i, :n].bool()],
                                       atol=1e-5, rtol=0)
    answers = torch.tensor([len(ids) for ids, _, _ in tiny.encode_answers([e.answer for e in ex])])
    longest = int((b.prompt_mask.sum(1) + answers).max())  # every answer here ends with a trained EOS
    assert widths[0] == longest < b.prompt_ids.shape[1] + b.ids.shape[1] - 10


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_a_groups_prompt_runs_once_and_scores_as_packed_rows(boi_biased, cfg_scale, monkeypatch):
    """grouped_states runs a group's prompt once and lets its G answers read its keys and values: the log-probs,
    entropies and gradients equal those of the packed rows, where every row runs its own prompt."""
    m, G = boi_biased, 3
    group = [p for p in _prompts() for _ in range(G)]
    ro = sample_interleaved(m, group, 0.8, max_new_tokens=40, generator=torch.Generator().manual_seed(3),
                            cfg_scale=cfg_scale)
    live = ro.mask.bool()
    assert ro.context[0] and (ro.is_image & live).any() and ro.mask.sum(1).min() < ro.mask.sum(1).max()
    widths, trunk = [], m.trunk
    monkeypatch.setattr(m, "trunk", lambda embeds, *a, **k: widths.append(embeds.shape) or trunk(embeds, *a, **k))
    out = {}
    for g in (1, G):
        m.zero_grad(set_to_none=True)
        logp, ent = sequence_logprobs(m, ro, 0.8, True, cfg_scale, group_size=g)
        (logp * ro.mask).sum().backward()
        out[g] = logp.detach(), ent, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    twins = 2 if cfg_scale != 1 else 1
    assert widths[1][0] == twins * len(_prompts()) and widths[2][0] == twins * len(group), "prompts once, answers after"
    torch.testing.assert_close(out[G][0][live], out[1][0][live], atol=2e-5, rtol=0)
    torch.testing.assert_close(out[G][0][live], ro.logp[live], atol=2e-5, rtol=0)
    torch.testing.assert_close(out[G][1][live], out[1][1][live], atol=2e-5, rtol=0)
    assert out[G][2].keys() == out[1][2].keys() and any("vision" in n for n in out[1][2])
    for n, grad in out[1][2].items():
        torch.testing.assert_close(out[G][2][n], grad, atol=1e-5, rtol=1e-4, msg=n)


def test_rows_switch_modality_independently_and_images_are_whole(boi_biased):
    m = boi_biased
    ro = sample_interleaved(m, _prompts() * 2, max_new_tokens=60, generator=torch.Generator().manual_seed(2))
    live = ro.mask.bool()
    mixed = ((ro.is_image & live).any(0) & (~ro.is_image & live).any(0))
    assert mixed.any(), "at some step, some rows are drawing while others write text"
    N = m.n_image_tokens
    for b in range(ro.ids.shape[0]):
        ids, img = ro.ids[b].tolist(), ro.is_image[b].tolist()
        t = 0
        while t < len(ids):
            if not img[t] and ids[t] == m.boi_id and ro.mask[b, t] > 0 and t + 1 < len(ids) and img[t + 1]:
                run = img[t + 1:t + 1 + N]
                assert all(run) or t + 1 + len(run) >= len(ids)
                if t + 1 + N < len(ids):  # <end_of_image> is forced, not sampled, right after a full grid
                    assert ids[t + 1 + N] == m.eoi_id and ro.mask[b, t + 1 + N] == 0 and not img[t + 1 + N]
                    assert ro.segment[b, t + 1] == ro.segment[b, t] + 1 == ro.segment[b, t + 1 + N]
                t += N + 1
            t += 1


@contextlib.contextmanager
def biased_and_counted(model, **bias):
    """Text logits biased (bias_text_logits), and the batch size of every trunk call recorded."""
    sizes, trunk = [], type(model).trunk

    def counting(self, embeds, *a, **kw):
        sizes.append(len(embeds))
        return trunk(self, embeds, *a, **kw)
    bias_text_logits(model, **bias)
    model.trunk = counting.__get__(model)
    try:
        yield sizes
    finally:
        del model.text_logits, model.trunk


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_finished_rows_leave_the_batch_and_change_no_draw(tiny, cfg_scale):
    """Rows that end early are dropped from the decode batch and the KV cache; every rollout is still what its group,
    sampled alone with its own generator, gives."""
    prompts, G = _prompts(), 2
    group = [p for p in prompts for _ in range(G)]
    gens = lambda: [torch.Generator().manual_seed(10 + k) for k in range(len(prompts))]
    with biased_and_counted(tiny, boi_id=1.5, eos_id=2.0) as sizes:  # images in some rows, early EOS in others
        ro = sample_interleaved(tiny, group, max_new_tokens=40, generator=gens(), cfg_scale=cfg_scale)
        alone = [sample_interleaved(tiny, group[k * G:(k + 1) * G], max_new_tokens=40, generator=[g],
                                    cfg_scale=cfg_scale) for k, g in enumerate(gens())]
    twins = 2 if cfg_scale != 1 else 1
    lengths = ro.mask.sum(1)
    assert lengths.min() < lengths.max() / 2 and (ro.is_image & ro.mask.bool()).any()
    assert sizes[0] == twins * len(prompts), "a group's rows share its prompt's prefill"
    assert sizes[1] == twins * len(group) and min(sizes) < twins * len(group), "finished rows left the batch"
    for k, a in enumerate(alone):
        rows, T = slice(k * G, (k + 1) * G), a.ids.shape[1]
        for name in ("ids", "is_image", "segment", "mask"):
            assert torch.equal(getattr(ro, name)[rows, :T], getattr(a, name)), name
        assert not ro.mask[rows, T:].any()
        torch.testing.assert_close(ro.logp[rows, :T], a.logp, atol=1e-5, rtol=0)
        assert torch.equal(ro.finished[rows], a.finished)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_a_group_shares_its_prompts_prefill(tiny, cfg_scale):
    """Rows given one prompt object run its prefill once (the KV cache is copied to them) and sample what rows given
    copies of it, each prefilled on its own, do: a GRPO group's rollouts are unchanged, at 1/G of the prefill."""
    prompts, G = _prompts(), 3
    shared = [p for p in prompts for _ in range(G)]
    copies = [list(p) for p in shared]  # equal, but distinct objects: one prefill per row
    gens = lambda: [torch.Generator().manual_seed(20 + k) for k in range(len(prompts))]
    with biased_and_counted(tiny, boi_id=1.5, eos_id=1.0) as sizes:
        one = sample_interleaved(tiny, shared, max_new_tokens=40, generator=gens(), cfg_scale=cfg_scale)
        prefilled_once = sizes[0]
        sizes.clear()
        each = sample_interleaved(tiny, copies, max_new_tokens=40, generator=gens(), cfg_scale=cfg_scale)
    twins = 2 if cfg_scale != 1 else 1
    assert prefilled_once == twins * len(prompts) and sizes[0] == twins * len(shared)
    assert (one.is_image & one.mask.bool()).any() and one.context[0], "images drawn; context images in the prefill"
    for name in ("prompt_ids", "prompt_mask", "ids", "is_image", "segment", "mask", "finished"):
        assert torch.equal(getattr(one, name), getattr(each, name)), name
    torch.testing.assert_close(one.logp, each.logp, atol=1e-5, rtol=0)
    assert all(torch.equal(a, b) for x, y in zip(one.context, each.context) for a, b in zip(x, y))


def test_limits_stop_runaway_rows(tiny):
    try:
        bias_text_logits(tiny, boi_id=-1e4, eos_id=-1e4)  # never close a text segment
        ro = sample_interleaved(tiny, _prompts(), max_new_tokens=100, max_text_tokens=7, generator=torch.Generator().manual_seed(0))
        assert ro.ids.shape[1] == 7 and not ro.finished.any()
        bias_text_logits(tiny, boi_id=1e4)  # always open an image
        ro = sample_interleaved(tiny, _prompts(), max_new_tokens=200, max_images=2, generator=torch.Generator().manual_seed(0))
        n_img = (ro.is_image & ro.mask.bool()).sum(1)
        assert (n_img == 2 * tiny.n_image_tokens).all() and not ro.finished.any()
        assert ro.ids.shape[1] < 200
        ro = sample_interleaved(tiny, _prompts(), max_new_tokens=30, max_images=9, generator=torch.Generator().manual_seed(0))
        assert ro.ids.shape[1] == 30 and not ro.finished.any()  # the total token budget
    finally:
        del tiny.text_logits


def test_decode_rollout_segments(tiny):
    ex = data.make_examples("story", 2, "rl", seed=0)
    b = make_batch(tiny, ex)
    b.mask = torch.where(b.ids == tiny.eoi_id, 0.0, b.mask)
    b.segment = torch.cumsum(torch.cat([torch.zeros(2, 1, dtype=torch.long),
                                        (b.is_image[:, 1:] != b.is_image[:, :-1]).long()], 1), 1)
    # the forced <eoi> belongs to the image segment: shift segments after each image back by one token
    for r in range(2):
        for t in range(1, b.ids.shape[1]):
            if b.ids[r, t] == tiny.eoi_id and b.is_image[r, t - 1]:
                b.segment[r, t] = b.segment[r, t - 1]
    segs, index = decode_rollout(tiny, b)[0]
    kinds = [k for k, _ in segs]
    assert kinds == ["text", "image"] * ex[0].n_steps
    assert [x for k, x in segs if k == "text"] == ex[0].ref_texts
    assert index == list(range(2 * ex[0].n_steps))


def test_generated_grid_is_the_vq_grid(tiny, tmp_path):
    # JanusConfig ties the VQ grid to the understanding path's; a mismatch once made the sampler draw
    # 9 codes where the VQ encodes 36, so no generated image could ever be right
    img = data.render(data.random_scene(random.Random(0)), tiny.image_size)
    codes = tiny.vq_encode([img])
    assert codes.shape[1] == tiny.n_image_tokens
    assert tiny.vq_decode(codes)[0].size == (tiny.image_size, tiny.image_size)
    (answer_ids, is_image, _), = tiny.encode_answers([[("image", img)]])
    assert sum(is_image) == tiny.n_image_tokens
    tiny.janus.save_pretrained(tmp_path); tiny.tokenizer.save_pretrained(tmp_path)
    assert unigrpo.load_model(str(tmp_path), "cpu").n_image_tokens == tiny.n_image_tokens  # and after a reload
    other = "4" if tiny.n_image_tokens == 9 else "8"  # a VQ built for another grid is refused, not silently cut
    cfg = unigrpo.get_config(["--patch_size", other])
    with pytest.raises(ValueError, match="grid"):
        unigrpo.tiny_janus(tiny.tokenizer, tiny.janus.model.vqmodel, cfg)


def test_checkpoint_round_trip_identical_logits(tiny, tmp_path):
    ex = data.make_examples("howto", 2, "rl", seed=0)
    b = make_batch(tiny, ex)
    before, _ = sequence_logprobs(tiny, b)
    unigrpo.save_checkpoint(tiny, str(tmp_path / "ck"), dict(iter=3))
    again = unigrpo.load_model(str(tmp_path / "ck"), "cpu").eval()
    after, _ = sequence_logprobs(again, make_batch(again, ex))
    assert torch.equal(before, after)
    assert unigrpo.load_state(str(tmp_path / "ck"))["iter"] == 3
    assert not (tmp_path / "ck.tmp").exists() and not (tmp_path / "ck.old").exists()


class Killed(BaseException):
    """A simulated SIGKILL: a BaseException, so atomic_dir's cleanup for ordinary errors does not run."""


def _save(path, it):
    unigrpo.atomic_dir(path, lambda d: torch.save(dict(iter=it), os.path.join(d, "trainer_state.pt")))


# every step of atomic_dir that touches the disk, and which checkpoint a kill just before it leaves
KILL_POINTS = [("makedirs", 0, 5), ("save", 0, 5), ("fsync", 0, 5), ("replace", 0, 5), ("replace", 1, 5),
               ("fsync", 2, 6), ("rmtree", 2, 6)]  # fsync 2: the parent folder, after both renames; rmtree 2: path.old


@pytest.mark.parametrize("step, nth, survives", KILL_POINTS)
def test_atomic_dir_survives_a_kill_at_every_point(tmp_path, monkeypatch, step, nth, survives):
    """Killed at each write, fsync, rename and removal, a checkpoint is whole afterwards, old or new, on load;
    and the next save succeeds (a leftover ck.old used to make every later save fail with ENOTEMPTY)."""
    p = str(tmp_path / "ck")
    _save(p, 5)
    where = dict(makedirs=(unigrpo.os, "makedirs"), save=(torch, "save"), fsync=(unigrpo.os, "fsync"),
                 replace=(unigrpo.os, "replace"), rmtree=(unigrpo.shutil, "rmtree"))
    mod, name = where[step]
    real, calls = getattr(mod, name), []

    def dying(*a, **k):
        calls.append(a)
        if len(calls) == nth + 1:
            raise Killed(step)
        return real(*a, **k)
    monkeypatch.setattr(mod, name, dying)
    with pytest.raises(Killed):
        _save(p, 6)
    monkeypatch.undo()
    assert unigrpo.load_state(p)["iter"] == survives
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # load cleaned up what the kill left
    _save(p, 7)
    assert unigrpo.load_state(p)["iter"] == 7


def test_atomic_dir_recovers_from_a_crash_between_renames(tmp_path):
    p = str(tmp_path / "ck")
    _save(p, 5)
    os.replace(p, p + ".old")  # as if killed after moving the old checkpoint away, before the new one landed
    assert unigrpo.load_state(p)["iter"] == 5
    assert os.path.exists(p) and not os.path.exists(p + ".old")


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tiny, tmp_path, monkeypatch):
    import errno
    p = str(tmp_path / "ck")
    unigrpo.save_checkpoint(tiny, p, dict(iter=3))
    real = torch.save

    def full(obj, f, *a, **k):
        real(obj, f, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device", f)
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space left"):
        unigrpo.save_checkpoint(tiny, p, dict(iter=4))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ck"] and unigrpo.load_state(p)["iter"] == 3
    assert unigrpo.load_model(p, "cpu").n_image_tokens == tiny.n_image_tokens


def test_config_both_forms_and_types():
    cfg = unigrpo.get_config(["--group_size", "8", "--kl_beta=0", "--process_reward=false", "--dry_run", "--out_dir", "x"])
    assert cfg.group_size == 8 and cfg.kl_beta == 0.0 and isinstance(cfg.kl_beta, float)
    assert cfg.process_reward is False and cfg.dry_run is True and cfg.out_dir == "x"
    pre = unigrpo.get_config(["--preset", "janus-pro-7b", "--group_size=2"])
    assert pre.model == "deepseek-community/Janus-Pro-7B" and pre.group_size == 2  # flags win over the preset


BAD_VALUES = [  # one per config key, and per kind of check: the flag, and a word of what it must be
    (["--gruop_size=4"], "did you mean --group_size"), (["--group_size", "four"], "--group_size expects int"),
    (["--kl_beta=abc"], "--kl_beta expects float"), (["--process_reward=maybe"], "--process_reward expects a boolean"),
    (["--lr"], "--lr needs a value"), (["stray"], "unexpected argument 'stray'"),
    (["--stage=train"], "--stage='train' is invalid: choose one of"), (["--stage=eval"], "python eval.py --out_dir"),
    (["--preset=big"], "--preset='big' is unknown"), (["--loss_type=mean"], "--loss_type='mean'"), (["--dtype=fp16"], "--dtype='fp16'"),
    (["--device=gpu"], "--device='gpu'"), (["--visual_scorer=foo"], "--visual_scorer='foo'"),
    (["--visual_scorer=openclip:"], "--visual_scorer='openclip:'"), (["--text_critic=./no/critic"], "--text_critic='./no/critic'"),
    (["--model=./nowhere"], "no Janus checkpoint at './nowhere'"), (["--warmup_data=/missing.jsonl"], "--warmup_data='/missing.jsonl'"),
    (["--out_dir="], "--out_dir=''"), (["--out_dir=/etc/hostname/run"], "--out_dir='/etc/hostname/run'"),
    (["--n_embd=33"], "multiple of --n_head=4"), (["--patch_size=12"], "--patch_size=12"), (["--lr=1e999"], "--lr=inf"),
    (["--group_size=1"], "at least 2"), (["--temperature=0"], "--temperature=0.0"), (["--inner_epochs=0"], "--inner_epochs=0"),
    (["--prompts_per_step=0"], "--prompts_per_step=0"), (["--max_new_tokens=0"], "--max_new_tokens=0"), (["--lr=-1"], "--lr=-1.0"),
    (["--rl_tasks=story,poem"], "--rl_tasks='story,poem'"), (["--fsdp"], "launch with torchrun"),
    (["--qlora"], "pass --lora_rank too"), (["--qlora", "--lora_rank=4", "--device=cpu"], "needs a CUDA GPU"),
] + [([f"--{k}={v}"], f"--{k}={v}") for k, v in [
    ("seed", -1), ("log_interval", 0), ("ckpt_interval", 0), ("storyboard_interval", 0), ("n_layer", 0), ("n_head", 0),
    ("image_size", 0), ("codebook_size", 1), ("lora_rank", -1), ("lora_alpha", 0), ("vq_steps", 0), ("clip_steps", 0),
    ("warmup_iters", 0), ("warmup_batch_size", 0), ("warmup_lr", 0.0), ("n_understanding", 0), ("interleaved_ratio", -0.5),
    ("cfg_scale", -1.0), ("max_text_tokens", 0), ("max_images", -1), ("grpo_iters", 0), ("clip_eps", 0.0), ("kl_beta", -0.1),
    ("grad_clip", 0.0), ("eval_prompts", 0), ("cpu_threads", -1), ("warmup_rise", -1), ("cfg_dropout", 1.0),
    ("eval_interval", -1), ("run_eval_prompts", 0), ("warmup_stall", 0.5), ("warmup_stall", -0.1)]]


@pytest.mark.parametrize("args, needle", BAD_VALUES)
def test_bad_values_fail_at_parse_time_naming_the_flag(args, needle, capsys, tmp_path):
    """Each bad value stops at get_config (before any stage: nothing written), status 2, the flag and value on stderr."""
    with pytest.raises(SystemExit) as err:
        unigrpo.main([f"--out_dir={tmp_path}/run", *args])
    assert err.value.code == 2
    out = capsys.readouterr()
    assert out.err.startswith("error: ") and needle in out.err and "Traceback" not in out.err + out.out, out.err
    assert os.listdir(tmp_path) == []


def test_every_numeric_key_has_a_range():
    assert {k for k, v in unigrpo.DEFAULTS.items() if type(v) in (int, float)} == set(unigrpo.RANGES)


@pytest.mark.parametrize("args, needle", [(["--temperature=0"], "--temperature=0.0"), (["--stage=eval"], "python eval.py"),
                                          (["--warmup_data=/missing.jsonl"], "--warmup_data")])
def test_cli_errors_exit_2_without_a_traceback(args, needle):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "unigrpo.py"), *args], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_dry_run_prints_config_and_memory_without_loading(tmp_path):
    """The full-scale preset's config and memory estimate, offline (the hub refuses) and writing nothing."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "unigrpo.py"), "--preset=janus-pro-7b", "--dry_run",
                        f"--out_dir={tmp_path}/o"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "WORLD_SIZE": "8"})
    assert r.returncode == 0, r.stderr
    assert '"model": "deepseek-community/Janus-Pro-7B"' in r.stdout
    assert "janus-pro-7b (7.41B parameters), 8 GPU(s)" in r.stdout and "--fsdp splits them over the 8 GPU(s)" in r.stdout
    rows = {line[:30].strip(): line[30:].split() for line in r.stdout.splitlines() if line[:30].strip() in
            ("weights", "gradients", "AdamW states", "reference model", "activations", "peak")}
    assert len(rows) == 6 and all(len(v) == 3 for v in rows.values()), r.stdout
    full, fsdp, lora = map(float, rows["peak"])
    assert lora < 80 < full and fsdp < 80  # on 80 GB GPUs the 7B's full fine-tune needs FSDP (or LoRA)
    assert not os.path.exists(f"{tmp_path}/o")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "unigrpo.py"), "--stage=grpo", f"--out_dir={tmp_path}",
                        f"--model={tmp_path}/nowhere"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "no Janus checkpoint at" in r.stderr and "nowhere" in r.stderr


def test_malformed_warmup_data_names_file_and_line(tmp_path):
    bad = tmp_path / "mix.jsonl"
    bad.write_text('{"task": "t2i", "prompt": [{"text": "draw"}], "answer": [{"text": "x"}]}\n{"task": "t2i", "prompt": [\n')
    with pytest.raises(ValueError, match=r"mix.jsonl:2"):
        data.load_jsonl(str(bad))


def test_trackers_mirror_metrics_and_name_their_install(tmp_path, monkeypatch):
    """--wandb_log and --tensorboard: a clear error naming the install where the package is missing; wandb is
    not installed here, so a stand-in module (the test's only fake) checks what the logger hands it."""
    import importlib.util
    import types
    for flag, pkg in (("--wandb_log", "wandb"), ("--tensorboard", "tensorboard")):
        if importlib.util.find_spec(pkg) is None:
            with pytest.raises(SystemExit, match=f"pip install {pkg}"):
                unigrpo.make_logger(unigrpo.get_config([f"--out_dir={tmp_path}", flag]))
    logged = []
    fake = types.SimpleNamespace(init=lambda **kw: logged.append(kw) or types.SimpleNamespace(log=logged.append))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = unigrpo.make_logger(unigrpo.get_config([f"--out_dir={tmp_path}", "--wandb_log", "--wandb_run_name=r1"]))
    log(dict(stage="grpo", iter=3, reward=0.5, loss=-1.0))
    assert logged[0]["name"] == "r1" and logged[0]["config"]["wandb_log"] is True
    assert logged[1] == {"grpo/iter": 3, "grpo/reward": 0.5, "grpo/loss": -1.0}
    assert '"reward": 0.5' in open(tmp_path / "metrics.jsonl").read()  # the source of truth
