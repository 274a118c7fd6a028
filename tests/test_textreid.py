"""TextReID: its three losses against loops, the momentum update, the queues (wrap-around, the
same-identity mask, DDP gathering, checkpoint round trip and exact resume), frozen word embeddings."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from tbps.config import Config, load_config
from tbps.engine.checkpoint import load_model_weights, read_checkpoint, save_checkpoint
from tbps.engine.optim import build_optimizer
from tbps.errors import TBPSError
from tbps.losses.textreid import global_align_loss, instance_loss, queue_infonce_loss
from tbps.models import METHODS, build_model
from tbps.models.methods.textreid import TextReID
from tiny_models import EOT, PAD, clip_tokenizer, random_token_ids, total_loss
from tiny_models import method_config

LENGTH = 12
TOKENIZER = clip_tokenizer(LENGTH)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(loss: dict | None = None, **method) -> Config:
    return method_config("textreid", loss, **method)


def tiny_batch(n: int = 8, per_id: int = 2, seed: int = 0, first_pid: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    token_ids = random_token_ids(n, g, LENGTH, min_words=2)
    return {"images": torch.randn(n, 3, 64, 32, generator=g), "token_ids": token_ids,
            "pids": first_pid + torch.arange(n) // per_id, "image_ids": torch.arange(n)}


# ----------------------------------------------------------------------------- losses vs loops

def test_instance_loss_matches_loop():
    torch.manual_seed(1)
    b, d, c, eps = 5, 4, 3, 0.1
    v, t = torch.randn(b, d, dtype=torch.float64), torch.randn(b, d, dtype=torch.float64)
    w = torch.randn(d, c, dtype=torch.float64)
    pids = torch.tensor([0, 2, 1, 2, 0])

    wl = w.tolist()

    def smoothed_ce(feats):
        x, total = feats.tolist(), 0.0
        for i in range(b):
            logits = [sum(x[i][k] * wl[k][j] / math.sqrt(sum(wl[m][j] ** 2 for m in range(d)))
                          for k in range(d)) for j in range(c)]
            log_z = math.log(sum(math.exp(z) for z in logits))
            for j in range(c):
                q = (1 - eps) * (j == int(pids[i])) + eps / c
                total -= q * (logits[j] - log_z)
        return total / b

    expected = smoothed_ce(v) + smoothed_ce(t)
    assert float(instance_loss(v, t, w, pids, epsilon=eps)) == pytest.approx(expected, rel=1e-10)
    # no smoothing: plain CE of each modality, summed
    plain = float(instance_loss(v, t, w, pids, epsilon=0.0))
    w_n = w / w.norm(dim=0, keepdim=True)
    assert plain == pytest.approx(float(F.cross_entropy(v @ w_n, pids) + F.cross_entropy(t @ w_n, pids)))


def test_global_align_loss_matches_loop():
    torch.manual_seed(2)
    b, d = 6, 5
    v, t = torch.randn(b, d, dtype=torch.float64), torch.randn(b, d, dtype=torch.float64)
    pids = torch.tensor([0, 0, 1, 2, 2, 2])
    total = 0.0
    for i in range(b):
        for j in range(b):
            s = float(v[i] @ t[j] / (v[i].norm() * t[j].norm()))
            if pids[i] == pids[j]:
                total += math.log(1 + math.exp(-10 * (s - 0.6)))
            else:
                total += math.log(1 + math.exp(40 * (s - 0.4)))
    expected = 2 * total / b
    assert float(global_align_loss(v, t, pids)) == pytest.approx(expected, rel=1e-10)
    other = float(global_align_loss(v, t, pids, alpha=0.5, beta=0.3, scale_pos=5, scale_neg=20))
    assert other != pytest.approx(expected)


def test_queue_infonce_matches_loop_with_the_negatives_mask():
    torch.manual_seed(3)
    b, k, d, temp = 4, 7, 5, 0.07
    q = F.normalize(torch.randn(b, d, dtype=torch.float64), dim=1)
    pos = F.normalize(torch.randn(b, d, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(k, d, dtype=torch.float64), dim=1)
    pids = torch.tensor([0, 1, 2, 3])
    queue_pids = torch.tensor([0, 0, 1, 5, -1, 6, 2])  # -1: an empty slot
    total = 0.0
    for i in range(b):
        terms = [float(q[i] @ pos[i]) / temp]
        terms += [float(q[i] @ queue[j]) / temp for j in range(k)
                  if int(queue_pids[j]) != int(pids[i]) and int(queue_pids[j]) >= 0]
        total += -terms[0] + math.log(sum(math.exp(x) for x in terms))
    expected = total / b
    loss = queue_infonce_loss(q, pos, queue, pids, queue_pids, temp)
    assert float(loss) == pytest.approx(expected, rel=1e-10)
    # without the mask (every filled slot a negative) the loss is larger: the mask matters
    unmasked = queue_infonce_loss(q, pos, queue, pids + 100, queue_pids.clamp(min=0), temp)
    assert float(unmasked) > float(loss)


def test_queue_infonce_masked_entries_do_not_matter_and_empty_rows_give_zero():
    torch.manual_seed(4)
    q = F.normalize(torch.randn(2, 3), dim=1)
    pos = F.normalize(torch.randn(2, 3), dim=1)
    queue = F.normalize(torch.randn(4, 3), dim=1)
    queue_pids = torch.tensor([7, 7, 8, -1])
    pids = torch.tensor([7, 9])
    changed = queue.clone()
    changed[0] = -changed[0]  # same identity as row 0, and row 1's negative
    changed[3] = torch.tensor([1.0, 0.0, 0.0])  # empty slot: never a negative
    moved = queue_infonce_loss(q[:1], pos[:1], changed, pids[:1], queue_pids)
    assert float(moved) == pytest.approx(float(queue_infonce_loss(q[:1], pos[:1], queue, pids[:1], queue_pids)))
    assert float(queue_infonce_loss(q[1:], pos[1:], changed, pids[1:], queue_pids)) != pytest.approx(
        float(queue_infonce_loss(q[1:], pos[1:], queue, pids[1:], queue_pids)))
    # a query whose every queue entry is excluded: loss 0, finite gradients
    q.requires_grad_()
    empty = queue_infonce_loss(q, pos, queue, pids, torch.full((4,), -1))
    empty.backward()
    assert float(empty.detach()) == 0.0 and torch.isfinite(q.grad).all()


# ----------------------------------------------------------------------------- model

def test_builds_with_last_stride_1_and_the_retrieval_contract():
    assert "textreid" in METHODS
    model = build_model(tiny_config(), num_classes=4, tokenizer=TOKENIZER).eval()
    assert isinstance(model, TextReID)
    assert model.image_encoder.grid_size == (4, 2)  # 64x32 / 16: the last stage keeps its resolution
    assert model.image_encoder.backbone.attnpool.positional_embedding.shape[0] == 1 + 4 * 2
    batch = tiny_batch()
    with torch.no_grad():
        images = model.embed_images(batch["images"])
        texts = model.embed_texts(batch["token_ids"])
    assert set(images) == set(texts) == {"global"}
    assert images["global"].shape == texts["global"].shape == (8, 16)
    torch.testing.assert_close(texts["global"].norm(dim=1), torch.ones(8))
    full = model.similarity(texts, images)
    rows = model.similarity({"global": texts["global"][2:5]}, {"global": images["global"][[1, 6]]})
    torch.testing.assert_close(rows, full[2:5][:, [1, 6]])


def test_text_feature_ignores_padding_and_words_after_the_end_token():
    model = build_model(tiny_config(), num_classes=4, tokenizer=TOKENIZER).eval()
    ids = tiny_batch()["token_ids"][:1]
    longer = torch.full((1, LENGTH + 0), PAD, dtype=torch.long)
    longer[0] = ids[0]
    end = int((ids[0] == EOT).nonzero()[0])
    if end + 1 < LENGTH:
        longer[0, end + 1:] = 77  # junk after the end token
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids), model.encode_text(longer))
        both = model.encode_text(torch.cat([ids, tiny_batch(seed=5)["token_ids"][:1]]))
    torch.testing.assert_close(both[:1], model.encode_text(ids))  # a batch-mate does not change it


def test_forward_losses_gradients_and_frozen_parts():
    model = build_model(tiny_config(), num_classes=20, tokenizer=TOKENIZER).train()
    out = model(tiny_batch())
    assert {"loss_instance", "loss_align", "loss_moco", "queue_fill"} <= set(out)
    assert out["loss_moco"].item() == 0.0  # the queue was empty: no negative yet
    out = model(tiny_batch(seed=1, first_pid=10))
    assert out["loss_moco"].item() > 0
    total_loss(out).backward()
    for name in ("image_encoder.backbone.conv1.weight", "text_encoder.gru.weight_ih_l0", "image_proj.weight",
                 "text_proj.weight", "id_projection"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert not model.word_embedding.weight.requires_grad
    key_params = [*model.image_encoder_k.parameters(), *model.text_encoder_k.parameters()]
    assert all(not p.requires_grad and p.grad is None for p in key_params)
    in_optimizer = {id(p) for group in build_optimizer(model, Config().optim).param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in key_params}
    assert id(model.word_embedding.weight) not in in_optimizer
    assert id(model.text_encoder.gru.weight_ih_l0) in in_optimizer


def test_momentum_update_is_an_exponential_moving_average():
    model = build_model(tiny_config(momentum=0.75), num_classes=4, tokenizer=TOKENIZER)
    for p in model.image_encoder.parameters():  # move the online encoders away from the copies
        p.data.add_(torch.randn_like(p))
    for p in model.text_encoder.parameters():
        p.data.mul_(3.0)
    pairs = [(q, k, k.detach().clone()) for online, key in model.key_encoder_pairs()
             for q, k in zip(online.parameters(), key.parameters())]
    assert len(pairs) > 10
    model.momentum_update()
    for q, k, k0 in pairs:
        torch.testing.assert_close(k, 0.75 * k0 + 0.25 * q)
    # a forward pass, in training or evaluation mode, leaves the copies alone: the update is the
    # trainer's on_step_end, after the optimiser step
    frozen = [k.detach().clone() for _, k, _ in pairs]
    for mode in (False, True):
        model.train(mode)
        model(tiny_batch())
        assert all(torch.equal(k, f) for (_, k, _), f in zip(pairs, frozen))
    model.on_step_end()
    for (q, k, _), f in zip(pairs, frozen):
        torch.testing.assert_close(k, 0.75 * f + 0.25 * q)


def test_enqueue_wraps_around_and_keeps_the_newest():
    model = build_model(tiny_config(queue_size=5), num_classes=4, tokenizer=TOKENIZER)
    keys = torch.arange(8 * 16, dtype=torch.float32).view(8, 16)
    model.enqueue(keys[:3], -keys[:3], torch.tensor([0, 1, 2]))
    assert int(model.queue_ptr) == 3 and model.queue_pids.tolist() == [0, 1, 2, -1, -1]
    model.enqueue(keys[3:6], -keys[3:6], torch.tensor([3, 4, 5]))  # slots 3, 4, then 0
    assert int(model.queue_ptr) == 1
    assert model.queue_pids.tolist() == [5, 1, 2, 3, 4]
    torch.testing.assert_close(model.image_queue, keys[[5, 1, 2, 3, 4]])
    torch.testing.assert_close(model.text_queue, -keys[[5, 1, 2, 3, 4]])
    model.enqueue(keys[:7], keys[:7], torch.arange(10, 17))  # more keys than slots: the newest 5
    assert int(model.queue_ptr) == 1
    assert sorted(model.queue_pids.tolist()) == [12, 13, 14, 15, 16]
    assert model.queue_pids.tolist() == [16, 12, 13, 14, 15]


def test_model_masks_same_identity_queue_entries():
    model = build_model(tiny_config(queue_size=6), num_classes=20, tokenizer=TOKENIZER).train()
    model(tiny_batch(n=6, per_id=2, first_pid=0))  # queue now holds ids 0, 0, 1, 1, 2, 2
    assert model.queue_pids.tolist() == [0, 0, 1, 1, 2, 2]
    batch = tiny_batch(n=4, per_id=2, seed=7, first_pid=1)  # ids 1, 1, 2, 2
    model.eval()  # no momentum step, no enqueue: the same queue for both calls
    with torch.no_grad():
        image_q = F.normalize(model.encode_image(batch["images"]), dim=1)
        text_q = F.normalize(model.encode_text(batch["token_ids"]), dim=1)
        image_k, text_k = model.encode_keys(batch["images"], batch["token_ids"])
        loss = model.moco_loss(image_q, text_q, image_k, text_k, batch["pids"])
        expected = 0.0
        for query, key, queue in ((image_q, text_k, model.text_queue), (text_q, image_k, model.image_queue)):
            for i in range(4):
                keep = [j for j in range(6) if int(model.queue_pids[j]) != int(batch["pids"][i])]
                assert len(keep) == 4
                logits = torch.cat([(query[i] @ key[i]).view(1), queue[keep] @ query[i]]) / 0.07
                expected += float(torch.logsumexp(logits.double(), 0) - logits[0]) / 4
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_checkpoint_restores_the_queue_and_the_next_loss(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_model(cfg, num_classes=20, tokenizer=TOKENIZER).train()
    for step in range(3):  # 24 keys through a queue of 12: wrapped around
        model(tiny_batch(seed=step, first_pid=4 * step))
    path = tmp_path / "last.pt"
    save_checkpoint(path, model=model, cfg=cfg, num_classes=20)
    state = read_checkpoint(path)["model"]
    assert {"image_queue", "text_queue", "queue_pids", "queue_ptr"} <= set(state)
    restored = build_model(cfg, num_classes=20, tokenizer=TOKENIZER, load_pretrained=False).train()
    assert int(restored.queue_pids.max()) == -1
    load_model_weights(restored, state)
    for name in ("image_queue", "text_queue", "queue_pids", "queue_ptr"):
        assert torch.equal(getattr(restored, name), getattr(model, name)), name
    batch = tiny_batch(seed=9, first_pid=1)
    a, b = model(batch), restored(batch)
    for key in ("loss_instance", "loss_align", "loss_moco"):
        assert a[key].item() == b[key].item(), key
    assert torch.equal(model.image_queue, restored.image_queue) and int(model.queue_ptr) == int(restored.queue_ptr)


def test_without_moco_is_the_baseline_model():
    model = build_model(tiny_config(loss={"instance": 1.0, "align": 1.0}), num_classes=4, tokenizer=TOKENIZER)
    assert model.image_encoder_k is None and model.text_encoder_k is None
    assert not any(name.endswith("queue") for name, _ in model.named_buffers())
    out = model(tiny_batch())
    assert set(k for k in out if k.startswith("loss_")) == {"loss_instance", "loss_align"}
    full = build_model(tiny_config(), num_classes=4, tokenizer=TOKENIZER)
    online = {k for k in full.state_dict() if not k.startswith(("image_encoder_k.", "text_encoder_k."))
              and "queue" not in k}
    assert online == set(model.state_dict())  # the same architecture at inference


@pytest.mark.slow  # 60 optimiser steps: about 15 s
def test_overfits_a_handful_of_pairs():
    torch.manual_seed(0)
    cfg = tiny_config(gru_hidden=32, queue_size=16)
    cfg.model.embed_dim = 32
    model = build_model(cfg, num_classes=8, tokenizer=TOKENIZER).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = tiny_batch(n=16, per_id=2)

    def r1() -> float:
        model.eval()
        with torch.no_grad():
            scores = model.similarity(model.embed_texts(batch["token_ids"]), model.embed_images(batch["images"]))
        model.train()
        return (batch["pids"][scores.argmax(1)] == batch["pids"]).float().mean().item()

    before = r1()
    for _ in range(60):
        out = model(batch)
        optimizer.zero_grad()
        total_loss(out).backward()
        optimizer.step()
    assert before < 0.5 and r1() == 1.0
    assert out["loss_moco"].item() < 2.0


@pytest.mark.parametrize("method, words", [
    ({"momentum": 1.0}, "method.momentum"),
    ({"queue_size": 0}, "method.queue_size"),
    ({"temperature": 0}, "method.temperature"),
    ({"gru_hidden": 0}, "method.gru_hidden"),
    ({"id_smoothing": 1.0}, "method.id_smoothing"),
    ({"cross_width": 128}, "unknown config key method.cross_width"),
])
def test_bad_options_are_one_line_errors(method, words):
    with pytest.raises(TBPSError, match=words) as info:
        build_model(tiny_config(**method), num_classes=4, tokenizer=TOKENIZER)
    assert "\n" not in str(info.value)


def test_unknown_loss_is_an_error():
    with pytest.raises(TBPSError, match="loss.sdm: unknown loss for method textreid"):
        build_model(tiny_config(loss={"sdm": 1.0}), num_classes=4, tokenizer=TOKENIZER)


# ----------------------------------------------------------------------------- frozen word embeddings

def test_word_embeddings_come_from_the_clip_file(tmp_path):
    import open_clip

    from tbps.models import backbones as B

    B.get_arch_config("tiny-rn")  # registers the tiny architectures with open_clip
    torch.manual_seed(0)
    reference = open_clip.create_model("tiny-rn", pretrained=None).state_dict()
    path = tmp_path / "tiny-rn.pt"
    torch.save(reference, path)
    cfg = tiny_config()
    cfg.model.pretrained = str(path)
    model = build_model(cfg, num_classes=4, tokenizer=TOKENIZER)
    table = reference["token_embedding.weight"]
    assert model.word_embedding.weight.shape == (49409, table.shape[1])
    torch.testing.assert_close(model.word_embedding.weight[:49408], table)
    torch.testing.assert_close(model.word_embedding.weight[49408], table.mean(dim=0))  # <|mask|>
    torch.testing.assert_close(model.image_encoder.backbone.conv1.weight, reference["visual.conv1.weight"])
    assert model.backbone_prefixes == ("image_encoder.backbone.",)


def test_word_embeddings_from_minilm():
    from tbps.data.tokenizers import build_tokenizer
    from tbps.models.backbones import build_hf_text

    tokenizer = build_tokenizer("minilm", LENGTH)
    cfg = tiny_config()
    cfg.model.text_backbone, cfg.model.text_pretrained, cfg.data.tokenizer = "hf", "minilm", "minilm"
    model = build_model(cfg, num_classes=4, tokenizer=tokenizer)
    expected = build_hf_text(cfg.model, tokenizer).backbone.get_input_embeddings().weight
    torch.testing.assert_close(model.word_embedding.weight, expected)
    assert model.text_encoder.gru.input_size == expected.shape[1] == 384
    ids = tokenizer(["a man in a blue shirt", "a woman with a red bag"])
    assert model.encode_text(ids).shape == (2, 16)


def test_synth_recipe_loads():
    cfg = load_config(REPO / "configs" / "textreid_synth.yaml")
    assert cfg.model.name == "textreid" and cfg.model.resnet_last_stride == 1
    assert cfg.method["queue_size"] == 512 and "cross_width" not in cfg.method
    assert cfg.loss == {"instance": 1.0, "align": 1.0, "moco": 1.0}
    for name in ("cuhk", "icfg", "rstp"):
        real = load_config(REPO / "configs" / f"textreid_{name}.yaml")
        assert real.model.name == "textreid" and real.model.resnet_last_stride == 1
        assert real.data.image_size == [384, 128] and real.model.embed_dim == 256
        assert real.method["queue_size"] == 2048 and real.method["momentum"] == 0.999


# ----------------------------------------------------------------------------- DDP

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _enqueue_worker(rank: int, world_size: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = build_model(tiny_config(queue_size=6), num_classes=4, tokenizer=TOKENIZER)
        keys = torch.full((2, 16), float(rank + 1))
        model.enqueue(keys, -keys, torch.tensor([10 * rank, 10 * rank + 1]))
        model.enqueue(keys * 3, -keys * 3, torch.tensor([10 * rank + 2, 10 * rank + 3]))  # wraps
        result = {"pids": model.queue_pids.tolist(), "ptr": int(model.queue_ptr),
                  "image": model.image_queue[:, 0].tolist()}
        Path(result_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes: about a minute on a loaded 2-core CPU
def test_ddp_enqueue_gathers_keys_of_every_rank(tmp_path):
    mp.spawn(_enqueue_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0 == r1  # every rank holds the same queue
    # first step: [0, 1 | 10, 11] at slots 0-3; second: [2, 3 | 12, 13] at 4, 5, 0, 1
    assert r0["pids"] == [12, 13, 10, 11, 2, 3] and r0["ptr"] == 2
    assert r0["image"] == [6.0, 6.0, 2.0, 2.0, 3.0, 3.0]


# ----------------------------------------------------------------------------- the trainer

TRAIN = [
    "model.name=textreid", "data.dataset=synth", "data.image_size=[64, 32]", "data.text_length=16",
    "data.tokenizer=clip", "data.batch_size=8", "data.sampler=identity", "data.num_instances=2",
    "data.num_workers=0", "model.image_backbone=tiny-rn", "model.text_backbone=clip", "model.pretrained=",
    "model.resnet_last_stride=1", "model.embed_dim=16", "loss={instance: 1.0, align: 1.0, moco: 1.0}",
    "method={gru_hidden: 8, queue_size: 12, momentum: 0.9}", "optim.lr=1e-3", "optim.warmup_epochs=1",
    "optim.eps=1e-8", "train.amp=off", "train.log_every=1", "train.device=cpu", "train.eval_split=none",
]


def _train_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss_moco"] for r in rows if r.get("split") == "train"}


@pytest.mark.slow  # three short training runs
def test_resume_continues_with_the_same_queue(tiny_synth_root, tmp_path):
    from tbps.engine.trainer import train

    def cfg(out: Path, *extra: str):
        return load_config(None, TRAIN + [f"data.root={tiny_synth_root}", f"train.output_dir={out}", *extra])

    summary = train(cfg(tmp_path / "full", "train.epochs=2"))
    reference = _train_losses(tmp_path / "full")
    cut = summary["steps"] // 2 + 1
    part = tmp_path / "part"
    train(cfg(part, "train.epochs=2", f"train.max_steps={cut}"))
    saved = read_checkpoint(part / "last.pt")["model"]
    assert int((saved["queue_pids"] >= 0).sum()) == 12  # the queue had filled (and wrapped)
    train(cfg(part, "train.epochs=2"), resume=True)
    resumed = _train_losses(part)
    assert reference[cut + 1] > 0
    for step in range(cut + 1, summary["steps"] + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    final_a = read_checkpoint(tmp_path / "full" / "last.pt")["model"]
    final_b = read_checkpoint(part / "last.pt")["model"]
    for key in ("image_queue", "text_queue", "queue_pids", "queue_ptr"):
        torch.testing.assert_close(final_a[key], final_b[key], rtol=1e-4, atol=1e-5)


def test_the_momentum_update_runs_once_per_optimiser_step_and_never_in_a_forward_pass(tiny_synth_root, tmp_path):
    from tbps.engine.train_loop import HookBase
    from tbps.engine.trainer import train

    class CountMomentumUpdates(HookBase):
        calls = 0

        def before_train(self) -> None:
            model = self.trainer.model
            update = model.momentum_update

            def counted() -> None:
                CountMomentumUpdates.calls += 1
                update()

            model.momentum_update = counted  # the instance's attribute: what on_step_end calls
            self.seen: list[tuple[int, int]] = []

        def after_step(self) -> None:
            self.seen.append((self.trainer.state.step, CountMomentumUpdates.calls))

    counter = CountMomentumUpdates()
    cfg = load_config(None, TRAIN + [f"data.root={tiny_synth_root}", f"train.output_dir={tmp_path / 'run'}",
                                     "train.max_steps=3", "train.eval_split=test"])
    summary = train(cfg, hooks=[counter])
    assert summary["steps"] == 3 and summary["best_R1"] is not None  # an evaluation ran, in eval mode
    assert counter.seen == [(1, 1), (2, 2), (3, 3)]
    model = counter.trainer.model
    for mode in (True, False):  # forward-only calls: no update
        model.train(mode)
        model(tiny_batch())
    assert CountMomentumUpdates.calls == 3
