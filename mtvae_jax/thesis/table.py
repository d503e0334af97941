"""The thesis's cross-validation table (its 4.3) as data, and our rows beside it in its units.

Source: the master's thesis "Multitask VAEs", section 4.3, 5 folds, mean of the
fold's test losses. The table names no data set. Its columns are the
reconstruction loss (decoder 1) and the regulariser (KL for the Gaussian VAE,
the VQ objective for the VQ-VAE). Units:

- Gaussian VAE: the reconstruction is a per-image sum of squared errors
  (the baseline's 13.97 is 0.0178 per pixel on 28 x 28), so ours, a per-pixel
  mean, is multiplied by the D = H * W * C values of an image; the KL is a sum
  over latent dimensions in both.
- VQ-VAE: both columns are per-pixel means / the VQ objective, as ours.

The single decoder's rows give the sampling but not the power-law exponent
(the thesis ran 20-60): each such row of the thesis has two lines, and both
are shown beside each of our exponents. The table's text lost some row labels
to its layout; a line is read as the row that its configuration lacks
otherwise (VQ 1: the 'SoftAdapt, EXACT' line under 'Single Decoder' is the
multidecoder's; VQ 3: the 'GAUSSIAN' line under 'Multi Decoder' is the
single decoder's). VQ configuration 2 has two unlabelled '-' lines, one of
them presumably the multidecoder with exact sampling: both are left out.
"""
import math

from mtvae_jax import data as data_lib
from mtvae_jax import families

# (model, configuration, method, sampling, balancing) -> ((reconstruction, regulariser), ...)
TABLE_4_3 = {
    ('vq', 1, 'none', None, 'fixed'): ((0.0028, 0.0101),),
    ('vq', 1, 'multi', 'exact', 'fixed'): ((0.0025, 0.0082),),
    ('vq', 1, 'multi', 'uniform', 'fixed'): ((0.0023, 0.0076),),
    ('vq', 1, 'multi', 'exact', 'softadapt'): ((0.0123, 0.0035),),
    ('vq', 1, 'multi', 'uniform', 'softadapt'): ((0.0024, 0.0042),),
    ('vq', 1, 'single', 'gaussian', 'fixed'): ((0.0028, 0.0028), (0.0029, 0.0029)),
    ('vq', 1, 'single', 'uniform', 'fixed'): ((0.0030, 0.0024), (0.0029, 0.0030)),
    ('vq', 2, 'multi', 'uniform', 'fixed'): ((0.0015, 0.0030),),
    ('vq', 2, 'multi', 'exact', 'softadapt'): ((0.0155, 0.0013),),
    ('vq', 2, 'multi', 'uniform', 'softadapt'): ((0.0422, 0.0009),),
    ('vq', 2, 'single', 'gaussian', 'fixed'): ((0.0031, 0.0014), (0.0031, 0.0013)),
    ('vq', 2, 'single', 'uniform', 'fixed'): ((0.0035, 0.0012), (0.0029, 0.0017)),
    ('vq', 3, 'none', None, 'fixed'): ((0.0019, 0.0024),),
    ('vq', 3, 'multi', 'exact', 'fixed'): ((0.0017, 0.0028),),
    ('vq', 3, 'multi', 'uniform', 'fixed'): ((0.0017, 0.0024),),
    ('vq', 3, 'multi', 'exact', 'softadapt'): ((0.0173, 0.0011),),
    ('vq', 3, 'multi', 'uniform', 'softadapt'): ((0.0178, 0.0009),),
    ('vq', 3, 'single', 'gaussian', 'fixed'): ((0.0037, 0.0005), (0.0038, 0.0008)),
    ('vq', 3, 'single', 'uniform', 'fixed'): ((0.0039, 0.0007), (0.0038, 0.0007)),
    ('gaussian', 1, 'none', None, 'fixed'): ((13.9709, 12.9533),),
    ('gaussian', 1, 'multi', 'exact', 'fixed'): ((11.4000, 17.3971),),
    ('gaussian', 1, 'multi', 'uniform', 'fixed'): ((10.4693, 18.3315),),
    ('gaussian', 1, 'multi', 'exact', 'softadapt'): ((13.1405, 14.5518),),
    ('gaussian', 1, 'multi', 'uniform', 'softadapt'): ((12.4119, 15.3202),),
    ('gaussian', 1, 'single', 'gaussian', 'fixed'): ((15.9364, 9.6976), (16.0320, 9.8522)),
    ('gaussian', 1, 'single', 'uniform', 'fixed'): ((15.8018, 11.5618), (15.7948, 11.5982)),
    ('gaussian', 2, 'none', None, 'fixed'): ((14.2267, 12.6536),),
    ('gaussian', 2, 'multi', 'exact', 'fixed'): ((11.5855, 17.2068),),
    ('gaussian', 2, 'multi', 'uniform', 'fixed'): ((10.6324, 18.3894),),
    ('gaussian', 2, 'multi', 'exact', 'softadapt'): ((13.1291, 14.7237),),
    ('gaussian', 2, 'multi', 'uniform', 'softadapt'): ((12.3718, 15.2931),),
    ('gaussian', 2, 'single', 'gaussian', 'fixed'): ((16.2399, 9.7985), (16.3881, 9.8226)),
    ('gaussian', 2, 'single', 'uniform', 'fixed'): ((15.9913, 11.5080), (15.9794, 11.6502)),
}

# Whether the thesis's reconstruction of a model is summed over an image's D values (else a mean).
SUMMED_OVER_IMAGE = {'gaussian': True, 'vq': False}
UNIT = {'gaussian': 'per-image sum of squared errors; KL summed over latent dimensions',
        'vq': 'per-pixel mean squared error; VQ objective'}


def thesis_values(fields):
  """The thesis's (reconstruction, regulariser) lines of a grid row, () without a counterpart."""
  return TABLE_4_3.get((fields['model'], fields['preset'], fields['method'], fields['sampling'],
                        fields['balancing']), ())


def pixels_per_image(data_name):
  """D = H * W * C of a named data set's images, or None where a folder decides it."""
  shape = getattr(data_lib.DATASETS.get(data_name), 'image_shape', None)
  if data_name == 'digits':
    shape = (8, 8, 1)
  return math.prod(shape) if shape else None


def in_thesis_units(fields, means, data_name):
  """(reconstruction, regulariser) of our row's means in the thesis's units, None where missing."""
  recon = means.get('recon_loss')
  if recon is not None and SUMMED_OVER_IMAGE[fields['model']]:
    pixels = pixels_per_image(data_name)
    recon = recon * pixels if pixels else None
  return recon, means.get(families.regularizer_metric(fields['model']))


def comparison(fields, means, data_name):
  """{'thesis': [[recon, reg], ...], 'ours': [recon, reg], 'ratio': [[recon, reg], ...]} of a
  row with a counterpart (ratio: ours / thesis), or None."""
  theirs = thesis_values(fields)
  if not theirs:
    return None
  ours = in_thesis_units(fields, means, data_name)
  ratios = [[None if o is None else o / t for o, t in zip(ours, line)] for line in theirs]
  return {'thesis': [list(line) for line in theirs], 'ours': list(ours), 'ratio': ratios,
          'unit': UNIT[fields['model']]}
