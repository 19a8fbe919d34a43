"""Losses and calibrated inference beyond the parity fixture."""
import torch
import torch.nn.functional as F

from model import SemanticEncoder
from model.inference import calibrate, squared_distances, upsampled_squared_distances
from model.loss import bar_loss, bar_target, sc_loss


def _bar_target_reference(labels, embeddings, encoder, size, ratio):
    """The official order: interpolate raw embeddings, then encode every pixel."""
    h, w = size
    small = F.interpolate(labels[:, None].float(), size=(int(h * ratio), int(w * ratio)), mode="nearest")[:, 0].long()
    table = torch.cat([embeddings, torch.zeros(1, embeddings.shape[1])])
    small[small == 255] = embeddings.shape[0]
    grid = F.interpolate(table[small].permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
    return encoder(grid.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_linear_bar_target_equals_encoding_every_pixel():
    torch.manual_seed(0)
    embeddings = torch.randn(6, 300)
    encoder = SemanticEncoder(300, 256, 0)
    labels = torch.randint(0, 6, (2, 64, 48))
    labels[:, :10] = 255
    fast = bar_target(labels, embeddings, encoder, (16, 12), 0.25)
    slow = _bar_target_reference(labels, embeddings, encoder, (16, 12), 0.25)
    assert fast.shape == (2, 256, 16, 12)
    assert torch.allclose(fast, slow, atol=1e-5, rtol=0)


def test_mlp_bar_target_matches_reference_and_gradients_reach_both_encoders():
    torch.manual_seed(0)
    embeddings = torch.randn(4, 300)
    encoder = SemanticEncoder(300, 32, hidden_size=64, dropout=0.0)
    labels = torch.randint(0, 4, (1, 32, 32))
    target = bar_target(labels, embeddings, encoder, (8, 8), 0.5)
    assert torch.allclose(target, _bar_target_reference(labels, embeddings, encoder, (8, 8), 0.5), atol=1e-6)
    features = torch.randn(1, 32, 8, 8, requires_grad=True)
    loss = bar_loss(features, labels, embeddings, encoder, ratio=0.5)
    loss.backward()
    assert features.grad.abs().sum() > 0
    assert encoder.model[0].weight.grad.abs().sum() > 0


def test_bar_ignores_pixels_and_is_mean_over_pixels_and_channels():
    embeddings = torch.eye(3)
    encoder = SemanticEncoder(3, 3, 0)
    with torch.no_grad():
        encoder.model.weight.copy_(torch.eye(3))
        encoder.model.bias.zero_()
    labels = torch.full((1, 8, 8), 1)
    labels[:, :, 4:] = 255
    features = torch.zeros(1, 3, 8, 8)
    features[:, :, :, 4:] = 100.0  # ignored pixels: must not count
    loss = bar_loss(features, labels, embeddings, encoder, ratio=1.0)
    # valid pixels have target e_1 = (0, 1, 0): squared error 1 in one of 3 channels
    assert torch.isclose(loss, torch.tensor(1 / 3))
    all_ignored = torch.full((1, 8, 8), 255)
    assert bar_loss(features, all_ignored, embeddings, encoder, ratio=1.0) == 0


def test_sc_loss_zero_when_prototypes_reproduce_distances_and_grad_finite():
    torch.manual_seed(0)
    embeddings = torch.randn(5, 8)
    encoder = SemanticEncoder(8, 8, 0)
    with torch.no_grad():
        encoder.model.weight.copy_(torch.eye(8) * 3.0)  # temperature 3 on the embedding side
        encoder.model.bias.zero_()
    loss = sc_loss(embeddings, encoder, [1, 2, 3, 4], temperature=3.0)
    assert abs(loss.item()) < 1e-6
    loss2 = sc_loss(embeddings, encoder, [1, 2, 3, 4], temperature=1.0)
    loss2.backward()
    assert loss2 > 0 and torch.isfinite(encoder.model.weight.grad).all()
    halved = sc_loss(embeddings, encoder, [1, 2, 3, 4], temperature=1.0, divide_by_num_classes=True)
    assert torch.isclose(halved, loss2 / 4)


def calibrated_nearest_prototype(features, prototypes, unseen, sigma, size=None):
    return calibrate(upsampled_squared_distances(features, prototypes, size), unseen, sigma)


def test_calibration_only_reorders_the_two_nearest_classes():
    prototypes = torch.tensor([[0.0], [1.0], [3.0]])
    features = torch.tensor([0.45, 0.9, 2.5]).view(1, 1, 1, 3)  # nearest: 0, 1, 2
    unseen = torch.tensor([False, True, False])
    pred = calibrated_nearest_prototype(features, prototypes, unseen, 1.0)
    assert pred.tolist() == [[[0, 1, 2]]]
    # sigma shrinks unseen class 1's squared distance: pixel 0 (d0=.2025, d1=.3025) flips to 1
    assert calibrated_nearest_prototype(features, prototypes, unseen, 0.5).tolist() == [[[1, 1, 2]]]
    # pixel 2 (2.5) has nearest {2, 1}: 2.25 * 0.5 > 0.25 keeps 2; 2.25 * 0.1 < 0.25 flips it
    assert calibrated_nearest_prototype(features, prototypes, unseen, 0.1).tolist() == [[[1, 1, 1]]]
    far = torch.tensor([0.1]).view(1, 1, 1, 1)
    unseen_far = torch.tensor([False, False, True])  # class 2 is not among the two nearest: never chosen
    assert calibrated_nearest_prototype(far, prototypes, unseen_far, 1e-6).item() == 0


def test_sigma_vector_equals_individual_calls_and_resizes():
    torch.manual_seed(0)
    features = torch.randn(2, 16, 5, 7)
    prototypes = torch.randn(6, 16)
    unseen = torch.tensor([False, False, True, False, True, False])
    sigmas = torch.tensor([0.2, 0.5, 1.0])
    stacked = calibrated_nearest_prototype(features, prototypes, unseen, sigmas, size=(20, 28))
    assert stacked.shape == (3, 2, 20, 28) and stacked.dtype == torch.long
    for i, s in enumerate(sigmas.tolist()):
        assert torch.equal(stacked[i], calibrated_nearest_prototype(features, prototypes, unseen, s, size=(20, 28)))
    up = F.interpolate(features, size=(20, 28), mode="bilinear", align_corners=False)
    assert torch.equal(stacked[2], squared_distances(up, prototypes).argmin(1))
    assert (stacked[0] != stacked[2]).any()
    assert unseen[stacked[0]].float().mean() >= unseen[stacked[2]].float().mean()
