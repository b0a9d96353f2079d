"""Loss landscapes and paper 1's figures, on a tiny model and small synthetic result files."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from dbprepro.attacks import settings_randomness
from dbprepro.models.classifiers import SmallCNN, save_classifier
from dbprepro.models.diffusion import save_diffusion
from dbprepro.paper1.figures import fig_attack_trajectories, fig_loss_landscape, fig_robustness_bars, trajectory_plane
from dbprepro.paper1.landscape import compute_landscapes, grid_axis, loss_landscape, plane_directions
from dbprepro.purifiers import DefendedClassifier, Purifier

PURIFICATION = dict(t_star=0.1, num_inference_steps=100, sampler="ddpm", eta=0.0, clip_output=True)
D, STEPS, N_TRACK = 64, 4, 2


def fixed_model(tiny_diffusion, fixed_draw=0):
    torch.manual_seed(0)
    clf = SmallCNN(width=8, hidden=16).eval()
    p = Purifier(*tiny_diffusion, t_star=0.1, num_inference_steps=100,
                 randomness=settings_randomness("dwbox", seed=0, fixed_draw=fixed_draw))
    return DefendedClassifier(clf, p)


def image():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 8, 8, generator=g) * 0.8 + 0.1
    u = torch.randn(1, 8, 8, generator=g)
    v = torch.randn(1, 8, 8, generator=g)
    return x, u / u.norm(), v / v.norm()


def direct_loss(model, x, y, sid):
    with torch.no_grad():
        logits = model(x.clamp(0, 1)[None], ids=torch.tensor([sid]), draws=torch.tensor([0]))
    return float(F.cross_entropy(logits, torch.tensor([y])))


def test_loss_landscape_shape_grid_point_and_centre(tiny_diffusion):
    model = fixed_model(tiny_diffusion)
    x, u, v = image()
    y, sid, extent, n = 3, 7, 0.6, 5
    grid = loss_landscape(model, x, y, sid, u, v, extent, n, batch_size=7)  # batches cross rows
    assert grid.shape == (n, n) and np.isfinite(grid).all()
    axis = grid_axis(extent, n)
    i, j = 4, 1
    pt = x + float(axis[i]) * u + float(axis[j]) * v
    assert grid[i, j] == pytest.approx(direct_loss(model, pt, y, sid), rel=1e-5, abs=1e-6)
    assert grid[n // 2, n // 2] == pytest.approx(direct_loss(model, x, y, sid), rel=1e-5, abs=1e-6)
    assert grid.std() > 0  # the grid really moves the input


def test_loss_landscape_refuses_random_randomness(tiny_diffusion):
    model = fixed_model(tiny_diffusion)
    model.purifier.randomness = settings_randomness("whitebox", seed=0)
    x, u, v = image()
    with pytest.raises(ValueError, match="fixed"):
        loss_landscape(model, x, 0, 0, u, v, 0.5, 3)


def test_plane_directions_orthonormal_also_when_degenerate():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(D), rng.standard_normal(D)
    for dw, eot in ((a, b), (a, 2 * a), (np.zeros(D), b), (np.zeros(D), np.zeros(D))):
        u, v = plane_directions(dw, eot)
        np.testing.assert_allclose([u @ u, v @ v, u @ v], [1, 1, 0], atol=1e-10)
    u, v = trajectory_plane(a, [rng.standard_normal((3, D)), rng.standard_normal((3, D))])
    np.testing.assert_allclose([u @ u, v @ v, u @ v], [1, 1, 0], atol=1e-10)


def synthetic_paths(tmp_path, setting, seed):
    """paths.npz of 2 tracked images: dwbox goes straight, the others wander."""
    rng = np.random.default_rng(seed)
    x = np.random.default_rng(99).uniform(0.2, 0.8, (N_TRACK, D)).astype(np.float32)
    direction = np.sign(np.random.default_rng(7).standard_normal((N_TRACK, 1, D)))
    steps = np.arange(STEPS + 1)[None, :, None] / STEPS * 0.1
    deltas = direction * steps
    if setting != "dwbox":
        deltas = deltas + rng.uniform(-0.05, 0.05, deltas.shape) * (steps > 0)
    path = tmp_path / f"{setting}_paths.npz"
    np.savez(path, ids=np.array([10, 11]), labels=np.array([1, 2]), x=x, deltas=deltas.astype(np.float32))
    return path


def synthetic_trace(tmp_path, setting, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for sid in range(10, 16):
        base = rng.uniform(0.1, 0.5)
        for s in range(STEPS + 1):
            loss = base + (0.5 * s if setting == "dwbox" else rng.uniform(0, 1))
            rows.append((sid, s, loss))
    path = tmp_path / f"{setting}_trace.parquet"
    pd.DataFrame(rows, columns=["id", "step", "loss"]).to_parquet(path)
    return path


def assert_figures(png, pdf):
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pdf.stat().st_size > 1000 and pdf.read_bytes()[:5] == b"%PDF-"


def test_compute_landscapes_and_landscape_figure(tiny_diffusion, tmp_path):
    unet, scheduler = tiny_diffusion
    save_diffusion(unet, scheduler, tmp_path / "diffusion")
    torch.manual_seed(0)
    save_classifier(SmallCNN(width=8, hidden=16), "small_cnn", {"width": 8, "hidden": 16}, tmp_path / "clf")
    dw, eot = synthetic_paths(tmp_path, "dwbox", 0), synthetic_paths(tmp_path, "whitebox_eot", 1)
    out = tmp_path / "landscape" / "vanilla.npz"
    compute_landscapes(tmp_path / "clf", tmp_path / "diffusion", dw, eot, out, purification=PURIFICATION,
                       variance_type="fixed_large", seed=0, fixed_draw=0, n_images=5, grid=5, device="cpu")
    z = np.load(out)
    assert z["loss"].shape == (N_TRACK, 5, 5) and z["ids"].tolist() == [10, 11]
    for u, v in zip(z["u"], z["v"]):
        np.testing.assert_allclose([u @ u, v @ v, u @ v], [1, 1, 0], atol=1e-8)
    d_dw = np.load(dw)["deltas"][:, -1].astype(np.float64)
    d_eot = np.load(eot)["deltas"][:, -1].astype(np.float64)
    # the dwbox end point lies on the u axis; the eot end point in the plane; extent 1.5 x max norm
    np.testing.assert_allclose(z["dwbox_path"][:, -1, 0], np.linalg.norm(d_dw, axis=1), rtol=1e-5)
    np.testing.assert_allclose(z["dwbox_path"][:, -1, 1], 0, atol=1e-5)
    np.testing.assert_allclose(z["eot_offplane"][:, -1], 0, atol=1e-5)
    np.testing.assert_allclose(z["extent"], 1.5 * np.maximum(np.linalg.norm(d_dw, axis=1),
                                                            np.linalg.norm(d_eot, axis=1)), rtol=1e-6)
    assert z["dwbox_path_loss"].shape == z["eot_path_loss"].shape == (N_TRACK, STEPS + 1)
    # the path starts at the clean image, which is the centre of the grid
    np.testing.assert_allclose(z["dwbox_path_loss"][:, 0], z["clean_loss"], rtol=1e-6)
    np.testing.assert_allclose(z["loss"][:, 2, 2], z["clean_loss"], rtol=1e-5)

    png, pdf = tmp_path / "fig" / "fig2.png", tmp_path / "fig" / "fig2.pdf"
    fig_loss_landscape({"vanilla": out, "addt": out}, png, pdf)
    assert_figures(png, pdf)


def test_trajectory_figure(tmp_path):
    settings = ("whitebox", "whitebox_eot", "dwbox")
    paths = {s: synthetic_paths(tmp_path, s, i) for i, s in enumerate(settings)}
    traces = {s: synthetic_trace(tmp_path, s, i) for i, s in enumerate(settings)}
    png, pdf = tmp_path / "fig1.png", tmp_path / "fig1.pdf"
    fig_attack_trajectories(paths, traces, png, pdf)
    assert_figures(png, pdf)


def test_robustness_bars(tmp_path):
    rows = []
    for d in ("vanilla", "addt"):
        for s, acc in (("whitebox", 0.6), ("whitebox_eot", 0.5), ("dwbox", 0.1)):
            for ev in ("single", "mean"):
                rows.append(dict(defense=d, threat="linf", norm="linf", eps=8 / 255, setting=s, attack="pgd",
                                 evaluation=ev, n_images=16, clean_accuracy=0.9, robust_accuracy=acc,
                                 ci_low=acc - 0.1, ci_high=acc + 0.1, mean_linf=0.03, mean_l2=1.0))
    csv = tmp_path / "p1_table_main.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    png, pdf = tmp_path / "fig3.png", tmp_path / "fig3.pdf"
    fig_robustness_bars(csv, png, pdf, confidence=0.95)
    assert_figures(png, pdf)
    with pytest.raises(ValueError, match="no rows"):
        fig_robustness_bars(csv, png, pdf, attack="bpda")


def test_robustness_bars_title_names_every_image_count(tmp_path, monkeypatch):
    from dbprepro.paper1 import figures

    titles = []

    def keep_title(fig, png, pdf):
        titles.append(fig.axes[0].get_title())
        figures.plt.close(fig)

    monkeypatch.setattr(figures, "save", keep_title)
    rows = [dict(defense=d, threat="linf", norm="linf", eps=0.2, setting=s, attack="pgd", evaluation="single",
                 n_images=n, clean_accuracy=0.9, robust_accuracy=0.3, ci_low=0.2, ci_high=0.4, mean_linf=0.2,
                 mean_l2=1.0)
            for d, n in (("vanilla", 64), ("edm", 24)) for s in ("whitebox_eot", "dwbox")]
    csv = tmp_path / "t.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    fig_robustness_bars(csv, tmp_path / "a.png", tmp_path / "a.pdf")
    pd.DataFrame(rows[:2]).to_csv(csv, index=False)
    fig_robustness_bars(csv, tmp_path / "a.png", tmp_path / "a.pdf")
    assert "n=24-64 images per defense" in titles[0] and "n=64 images" in titles[1]
