"""splice_media against a slow per-sample reference on random ragged inputs."""

import pytest
import torch

from llava_deft.model.splice import IGNORE_INDEX, splice_media

PH = 99


def reference(input_ids, attention_mask, text, media, mmask, midx, morig, labels, side):
    """One sample at a time, one token at a time."""
    rows, m = [], 0
    for b in range(input_ids.shape[0]):
        emb, msk, pos, lab, med = [], [], [], [], []
        p = 0
        for t in range(input_ids.shape[1]):
            real = bool(attention_mask[b, t])
            if real and input_ids[b, t] == PH:
                for k in range(media.shape[1]):
                    if mmask[m, k]:
                        emb.append(media[m, k]); msk.append(1); pos.append(p + int(midx[m, k])); lab.append(IGNORE_INDEX); med.append(True)
                p += int(morig[m])
                m += 1
            else:
                emb.append(text[b, t]); msk.append(int(real)); pos.append(p if real else 0)
                lab.append(int(labels[b, t])); med.append(False)
                p += int(real)
        rows.append((emb, msk, pos, lab, med))
    n = max(len(r[0]) for r in rows)
    d = text.shape[-1]
    out = [torch.zeros(len(rows), n, d), torch.zeros(len(rows), n, dtype=torch.long), torch.zeros(len(rows), n, dtype=torch.long),
           torch.full((len(rows), n), IGNORE_INDEX), torch.zeros(len(rows), n, dtype=torch.bool)]
    for b, (emb, msk, pos, lab, med) in enumerate(rows):
        off = n - len(emb) if side == "left" else 0
        sl = slice(off, off + len(emb))
        out[0][b, sl] = torch.stack(emb); out[1][b, sl] = torch.tensor(msk); out[2][b, sl] = torch.tensor(pos)
        out[3][b, sl] = torch.tensor(lab); out[4][b, sl] = torch.tensor(med)
    return out


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_splice_matches_reference(side, seed):
    g = torch.Generator().manual_seed(seed)
    b, l, d, k = 4, 12, 8, 10
    n_media = [2, 0, 1, 3]  # a text-only sample in the middle, several images in one sample
    lengths = [12, 5, 9, 11]
    ids = torch.randint(0, 50, (b, l), generator=g)
    am = torch.zeros(b, l, dtype=torch.long)
    for i, (n, ln) in enumerate(zip(n_media, lengths)):
        sl = slice(l - ln, l) if side == "left" else slice(0, ln)
        am[i, sl] = 1
        real = torch.arange(l)[sl]
        ids[i, real[torch.randperm(ln, generator=g)[:n]]] = PH
    m = sum(n_media)
    media = torch.randn(m, k, d, generator=g)
    kept = torch.randint(1, k + 1, (m,), generator=g)
    mmask = torch.arange(k).expand(m, k) < kept.unsqueeze(1)
    orig = torch.full((m,), 16)
    midx = torch.sort(torch.rand(m, 16, generator=g).argsort(1)[:, :k], dim=1).values  # ascending original positions
    text = torch.randn(b, l, d, generator=g)
    labels = torch.randint(0, 50, (b, l), generator=g)
    out = splice_media(ids, am, text, ids == PH, media, mmask, midx, orig, labels, side)
    ref = reference(ids, am, text, media, mmask, midx, orig, labels, side)
    torch.testing.assert_close(out.embeds, ref[0])
    assert torch.equal(out.attention_mask, ref[1])
    assert torch.equal(out.position_ids, ref[2])
    assert torch.equal(out.labels, ref[3])
    assert torch.equal(out.media_positions, ref[4])


def test_pruned_media_keeps_original_positions_of_following_text():
    """Text after a media span sits at the same position whether or not media tokens were pruned."""
    ids = torch.tensor([[1, PH, 2, 3]])
    am = torch.ones_like(ids)
    text = torch.randn(1, 4, 4)
    full = splice_media(ids, am, text, ids == PH, torch.randn(1, 8, 4), torch.ones(1, 8, dtype=torch.bool),
                        torch.arange(8)[None], torch.tensor([8]))
    pruned = splice_media(ids, am, text, ids == PH, torch.randn(1, 3, 4), torch.ones(1, 3, dtype=torch.bool),
                          torch.tensor([[0, 4, 7]]), torch.tensor([8]))
    assert full.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    assert pruned.position_ids.tolist() == [[0, 1, 5, 8, 9, 10]]


def test_gradient_reaches_media_and_text():
    ids = torch.tensor([[1, PH, 2], [PH, 3, 0]])
    am = torch.tensor([[1, 1, 1], [1, 1, 0]])
    text = torch.randn(2, 3, 4, requires_grad=True)
    media = torch.randn(2, 5, 4, requires_grad=True)
    out = splice_media(ids, am, text, ids == PH, media, torch.ones(2, 5, dtype=torch.bool), torch.arange(5).expand(2, 5), torch.tensor([5, 5]))
    (out.embeds * out.attention_mask.unsqueeze(-1)).sum().backward()
    assert torch.all(media.grad == 1)
    expected = ((ids != PH) & am.bool()).float().unsqueeze(-1).expand_as(text)  # real text tokens only
    assert torch.equal(text.grad, expected)
