"""PyTorch twins of mtvae_jax's models and train step: the benchmark's reference.

Layer for layer the networks of mtvae_jax/models (kernel sizes, strides,
paddings, batch norm, LeakyReLU 0.01, sigmoid output, the input padded at
the bottom/right to a multiple of 2**L), the training masks of
mtvae_jax/masks ('exact' and 'uniform' sampling, the ones the configs use;
'fixed' and 'power_law' counts) and the loss of mtvae_jax/train.py with the
fixed weights config.loss.weights (loss.balancing='fixed', the default), with
AdamW. config.train.precision='bfloat16' runs the forward pass and loss under
torch.autocast in bfloat16 (the quantiser's distances in float32, as in
mtvae_jax), the parameters and optimizer staying float32. Tensors are NCHW; flattening goes through NHWC order and submodules
carry the flax parameter tree's names, so `load_flax` copies a flax model's
variables in one to one (tests/test_torch_reference.py checks that both then
compute the same). One difference: torch's batch norm keeps the unbiased
batch variance as its running variance, flax the biased one; a train step's
loss and gradients do not depend on it.
"""
import math

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from mtvae_jax import config as config_lib
from mtvae_jax import masks
from mtvae_jax import methods
from mtvae_jax.models import conditioning
from mtvae_jax.models import layers


def _leaky(x):
  return F.leaky_relu(x, layers.LEAKY_SLOPE)


def _batch_norm(features):
  return nn.BatchNorm2d(features, eps=1e-5, momentum=0.1)


def _down(in_features, features, kernel):
  return nn.Conv2d(in_features, features, kernel, stride=2, padding=1)


def _up(in_features, features, kernel):
  return nn.ConvTranspose2d(in_features, features, kernel, stride=2, padding=1,
                            output_padding=kernel % 2)


def _flatten(x):
  """(B, C, H, W) -> (B, H*W*C) in flax's NHWC order."""
  return x.permute(0, 2, 3, 1).flatten(1)


def _merge_condition(dense, z, m, shape):
  """layers.merge_condition: dense(concat(flat z, flat m)) -> (B, C, h, w) for shape (C, h, w)."""
  h = z.flatten(1) if z.dim() == 2 else _flatten(z)
  if m is not None:
    h = torch.cat([h, _flatten(m)], dim=1)
  channels, height, width = shape
  return dense(h).view(-1, height, width, channels).permute(0, 3, 1, 2)


class _SpatialCondition(nn.Module):
  """conditioning.SpatialCondition: m (B, 1 + C, H, W) -> {(h, w): features (B, c, h, w)}."""

  def __init__(self, m_channels, hidden_sizes, first_grid):
    super().__init__()
    widths = conditioning.spatial_widths(hidden_sizes)
    self.padded = [side << len(widths) for side in first_grid]
    self.channels = (m_channels, *widths)  # by level, the padded image's first
    for i, (cin, cout) in enumerate(zip(self.channels, widths)):
      setattr(self, f'Conv_{i}', _down(cin, cout, 3))

  def forward(self, m):
    h = F.pad(m, (0, self.padded[1] - m.shape[3], 0, self.padded[0] - m.shape[2]))
    levels = {tuple(h.shape[2:]): h}
    for i in range(len(self.channels) - 1):
      h = _leaky(getattr(self, f'Conv_{i}')(h))
      levels[tuple(h.shape[2:])] = h
    return levels


def _spatial_channels(decoder, m_features, conditioning_name, out_channels, hidden_sizes, grid):
  """Gives `decoder` its SpatialCondition_0 when it takes m spatially; the channels m adds by
  level (the padded image's first), all 0 otherwise."""
  if conditioning_name != 'spatial' or not m_features:
    return (0,) * (len(hidden_sizes) + 1)
  decoder.SpatialCondition_0 = _SpatialCondition(out_channels + 1, hidden_sizes, grid)
  return decoder.SpatialCondition_0.channels


def _levels(decoder, m):
  """m's features by grid for _attach where `decoder` takes m spatially, else None."""
  spatial = getattr(decoder, 'SpatialCondition_0', None)
  return None if spatial is None or m is None else spatial(m)


def _attach(h, levels):
  """conditioning.attach: h (B, c, h, w) with m's features on its grid appended as channels."""
  return h if levels is None else torch.cat([h, levels[tuple(h.shape[2:])]], dim=1)


class _Residual(nn.Module):
  """x + conv1x1(relu(conv3x3(x))), as layers.ResidualLayer."""

  def __init__(self, features):
    super().__init__()
    self.Conv_0 = nn.Conv2d(features, features, 3, padding=1, bias=False)
    self.Conv_1 = nn.Conv2d(features, features, 1, bias=False)

  def forward(self, x):
    return x + self.Conv_1(F.relu(self.Conv_0(x)))


class _GaussianEncoder(nn.Module):

  def __init__(self, channels, hidden_sizes, latent_dim, grid):
    super().__init__()
    self.depth = len(hidden_sizes)
    for i, (cin, cout) in enumerate(zip((channels, *hidden_sizes), hidden_sizes)):
      setattr(self, f'Conv_{i}', _down(cin, cout, 3))
      setattr(self, f'BatchNorm_{i}', _batch_norm(cout))
    flat = hidden_sizes[-1] * math.prod(grid)
    self.Dense_0 = nn.Linear(flat, latent_dim)
    self.Dense_1 = nn.Linear(flat, latent_dim)

  def forward(self, x):
    for i in range(self.depth):
      x = _leaky(getattr(self, f'BatchNorm_{i}')(getattr(self, f'Conv_{i}')(x)))
    x = _flatten(x)
    return self.Dense_0(x), self.Dense_1(x)


class _GaussianDecoder(nn.Module):

  def __init__(self, latent_dim, hidden_sizes, grid, out_channels, m_features, conditioning_name):
    super().__init__()
    self.start = (hidden_sizes[-1], *grid)
    extra = _spatial_channels(self, m_features, conditioning_name, out_channels, hidden_sizes,
                              grid)[::-1]  # by grid, from the first (smallest)
    dense_m = 0 if hasattr(self, 'SpatialCondition_0') else m_features
    self.Dense_0 = nn.Linear(latent_dim + dense_m, math.prod(self.start))
    sizes = (*reversed(hidden_sizes[:-1]), hidden_sizes[0])
    self.depth = len(sizes)
    for i, (cin, cout) in enumerate(zip((hidden_sizes[-1], *sizes), sizes)):
      setattr(self, f'ConvTranspose_{i}', _up(cin + extra[i], cout, 3))
      setattr(self, f'BatchNorm_{i}', _batch_norm(cout))
    self.Conv_0 = nn.Conv2d(hidden_sizes[0] + extra[-1], out_channels, 3, padding=1)

  def forward(self, z, m=None):
    levels = _levels(self, m)
    h = _attach(_merge_condition(self.Dense_0, z, m if levels is None else None, self.start),
                levels)
    for i in range(self.depth):
      h = _leaky(getattr(self, f'BatchNorm_{i}')(getattr(self, f'ConvTranspose_{i}')(h)))
      h = _attach(h, levels)
    return torch.sigmoid(self.Conv_0(h))


class _VQEncoder(nn.Module):

  def __init__(self, channels, hidden_sizes, num_residual_layers, embedding_dim):
    super().__init__()
    self.depth, self.num_residual_layers = len(hidden_sizes), num_residual_layers
    for i, (cin, cout) in enumerate(zip((channels, *hidden_sizes), hidden_sizes)):
      setattr(self, f'Conv_{i}', _down(cin, cout, 4))
      setattr(self, f'BatchNorm_{i}', _batch_norm(cout))
    width = hidden_sizes[-1]
    setattr(self, f'Conv_{self.depth}', nn.Conv2d(width, width, 3, padding=1))
    for i in range(num_residual_layers):
      setattr(self, f'ResidualLayer_{i}', _Residual(width))
    setattr(self, f'Conv_{self.depth + 1}', nn.Conv2d(width, embedding_dim, 1))

  def forward(self, x):
    for i in range(self.depth):
      x = _leaky(getattr(self, f'BatchNorm_{i}')(getattr(self, f'Conv_{i}')(x)))
    x = _leaky(getattr(self, f'Conv_{self.depth}')(x))
    for i in range(self.num_residual_layers):
      x = getattr(self, f'ResidualLayer_{i}')(x)
    return _leaky(getattr(self, f'Conv_{self.depth + 1}')(_leaky(x)))


class _VQDecoder(nn.Module):

  def __init__(self, m_features, hidden_sizes, num_residual_layers, embedding_dim, grid,
               out_channels, conditioning_name):
    super().__init__()
    self.start = (embedding_dim, *grid)
    extra = _spatial_channels(self, m_features, conditioning_name, out_channels, hidden_sizes,
                              grid)[::-1]  # by grid, from the first (smallest)
    if m_features and not hasattr(self, 'SpatialCondition_0'):
      self.Dense_0 = nn.Linear(m_features + math.prod(self.start), math.prod(self.start))
    self.num_residual_layers = num_residual_layers
    self.Conv_0 = nn.Conv2d(embedding_dim + extra[0], hidden_sizes[-1], 3, padding=1)
    for i in range(num_residual_layers):
      setattr(self, f'ResidualLayer_{i}', _Residual(hidden_sizes[-1]))
    sizes = (*reversed(hidden_sizes[:-1]), out_channels)
    self.depth = len(sizes)
    for i, (cin, cout) in enumerate(zip(tuple(reversed(hidden_sizes)), sizes)):
      setattr(self, f'ConvTranspose_{i}', _up(cin + (extra[i] if i else 0), cout, 4))
      if i < self.depth - 1:
        setattr(self, f'BatchNorm_{i}', _batch_norm(cout))

  def forward(self, z_q, m=None):
    levels = _levels(self, m)
    h = z_q if m is None or levels is not None else _merge_condition(self.Dense_0, z_q, m,
                                                                     self.start)
    h = _leaky(self.Conv_0(_attach(h, levels)))
    for i in range(self.num_residual_layers):
      h = getattr(self, f'ResidualLayer_{i}')(h)
    h = _leaky(h)
    for i in range(self.depth - 1):
      h = _leaky(getattr(self, f'BatchNorm_{i}')(getattr(self, f'ConvTranspose_{i}')(h)))
      h = _attach(h, levels)
    return torch.sigmoid(getattr(self, f'ConvTranspose_{self.depth - 1}')(h))


# config.train.precision -> torch.autocast's dtype; float32 runs without autocast.
AUTOCAST_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16}


def autocast(device, precision):
  """The context in which a forward pass computes in `precision` (AUTOCAST_DTYPES)."""
  dtype = AUTOCAST_DTYPES[precision]
  return torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)


class _Quantizer(nn.Module):

  def __init__(self, num_embeddings, embedding_dim):
    super().__init__()
    bound = 1.0 / num_embeddings
    self.codebook = nn.Parameter(torch.empty(num_embeddings, embedding_dim).uniform_(-bound, bound))

  def forward(self, z_e):
    """z_e (B, D, h, w) -> straight-through z_q and z_q, each (B, D, h, w), in float32."""
    z_e = z_e.float()
    flat = z_e.permute(0, 2, 3, 1)
    with autocast(z_e.device.type, 'float32'):
      distances = (flat.square().sum(-1, keepdim=True) - 2.0 * flat @ self.codebook.T
                   + self.codebook.square().sum(-1))
    z_q = self.codebook[distances.argmin(-1)].permute(0, 3, 1, 2)
    return z_e + (z_q - z_e).detach(), z_q


class _Autoencoder(nn.Module):
  """base.MultitaskAutoencoder: the decoders of config.method over one shared z."""

  def __init__(self, config, image_shape, num_down, make_decoder):
    super().__init__()
    self.method, self.image_shape = methods.of(config), tuple(image_shape)
    height, width, channels = self.image_shape
    self.padded = [layers.padded_side(side, num_down) for side in (height, width)]
    self.grid = tuple(side >> num_down for side in self.padded)
    for name in self.method.decoders:  # make_decoder(the features of m that it is given)
      setattr(self, name, make_decoder(
          height * width * (channels + 1) if name == methods.CONDITIONED else 0))

  def pad(self, x):
    return F.pad(x, (0, self.padded[1] - x.shape[3], 0, self.padded[0] - x.shape[2]))

  def decode(self, z, m=None):
    height, width, channels = self.image_shape
    if m is None and methods.PLAIN not in self.method.decoders:
      m = z.new_zeros(z.shape[0], channels + 1, height, width)
    out = self.decoder(z) if m is None else self.cond_decoder(z, m)
    return out[:, :, :height, :width]

  def forward(self, x, conds):
    z, terms = self.encode(x)
    return {name: self.decode(z, m) for name, m in conds.items()}, terms


class GaussianVAE(_Autoencoder):
  """models.gaussian.GaussianVAE."""

  def __init__(self, config, image_shape):
    hidden, latent = tuple(config.gaussian.hidden_sizes), config.gaussian.latent_dim
    channels = image_shape[-1]
    super().__init__(config, image_shape, len(hidden), lambda cond: _GaussianDecoder(
        latent, hidden, self.grid, channels, cond, config.conditioning))
    self.encoder = _GaussianEncoder(channels, hidden, latent, self.grid)

  def encode(self, x):
    mean, log_var = self.encoder(self.pad(x))
    z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
    kl = 0.5 * (-log_var - 1.0 + mean.square() + log_var.exp()).sum(-1)
    return z, {'kl': kl}


class VQVAE(_Autoencoder):
  """models.vq.VQVAE."""

  def __init__(self, config, image_shape):
    vq = config.vq
    hidden, channels = tuple(vq.hidden_sizes), image_shape[-1]
    super().__init__(config, image_shape, len(hidden), lambda cond: _VQDecoder(
        cond, hidden, vq.num_residual_layers, vq.embedding_dim, self.grid, channels,
        config.conditioning))
    self.commitment_cost = vq.commitment_cost
    self.encoder = _VQEncoder(channels, hidden, vq.num_residual_layers, vq.embedding_dim)
    self.quantizer = _Quantizer(vq.num_embeddings, vq.embedding_dim)

  def encode(self, x):
    z_e = self.encoder(self.pad(x))
    z_q_st, z_q = self.quantizer(z_e)
    codebook = (z_e.detach() - z_q).square().sum(1).mean((1, 2))
    commitment = (z_e - z_q.detach()).square().sum(1).mean((1, 2))
    return z_q_st, {'vq': codebook + self.commitment_cost * commitment}


MODELS = {'gaussian': GaussianVAE, 'vq': VQVAE}


def batch_masks(mask_config, shape, count=None, device=None):
  """(B, 1, H, W) training masks for shape (B, H, W) as masks.batch_masks draws them."""
  batch, height, width = shape
  pixels = height * width
  if (count or mask_config.count) == 'power_law':
    u = torch.rand(batch, device=device) ** (1.0 / mask_config.power_law_exponent)
    k = torch.floor(pixels * (1.0 - u))
  else:
    k = torch.full((batch,), float(mask_config.num_pixels), device=device)
  if mask_config.sampling == 'exact':
    ranks = torch.from_numpy(masks.bayer_ranks(height, width)).view(1, pixels).to(device)
  elif mask_config.sampling == 'uniform':
    ranks = torch.rand(batch, pixels, device=device).argsort(1).argsort(1)
  else:
    raise ValueError(f'mask.sampling={mask_config.sampling!r} has no torch twin: use exact or uniform')
  return (ranks < k[:, None]).float().view(batch, 1, height, width)


def train_conds(config, images):
  """methods.train_conds: {term name: m (B, 1 + C, H, W) or None}."""
  def draw():
    mask = batch_masks(config.mask, (images.shape[0], *images.shape[2:]), device=images.device)
    return torch.cat([mask, mask * images], dim=1)

  return methods.decoder_inputs(methods.of(config).train, draw)


def loss_terms(model, config, images):
  """Mean over the batch of each loss term, as train.loss_terms then train_step average."""
  outputs, terms = model(images, train_conds(config, images))
  terms = dict(terms, **{name: (images - out).square().mean((1, 2, 3))
                         for name, out in outputs.items()})
  return {name: value.mean() for name, value in terms.items()}


def weighted_loss(config, means):
  weights = config.loss.weights
  return sum(weights[name] * value for name, value in means.items() if name in weights)


class TrainStep:
  """train.train_step in PyTorch: masks, forward, loss, backward, AdamW.

  `compile=True` wraps the forward pass and loss in torch.compile; backward
  and the optimizer stay eager. The forward pass and loss run in
  config.train.precision (`autocast`).
  """

  def __init__(self, config, image_shape, compile=False, device='cpu'):  # pylint: disable=redefined-builtin
    self.config = config = config_lib.resolve_for_images(config, image_shape)
    self.model = MODELS[config.model](config, image_shape).train().to(device)
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.train.learning_rate,
                                       weight_decay=config.train.weight_decay, eps=1e-8)
    def loss(images):
      with autocast(device, config.train.precision):
        return weighted_loss(config, loss_terms(self.model, config, images))

    self.loss = torch.compile(loss) if compile else loss

  def __call__(self, images):
    """images: (B, C, H, W) float32 in [0, 1]. Returns the loss (a 0-d tensor)."""
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.loss(images)
    loss.backward()
    self.optimizer.step()
    return loss.detach()


def load_flax(model, variables):
  """Copies flax variables {'params': ..., 'batch_stats': ...} into `model` in place."""
  params, stats = variables['params'], variables.get('batch_stats', {})
  tensor = lambda a: torch.from_numpy(np.array(a, np.float32))
  with torch.no_grad():
    for name, module in model.named_modules():
      path = name.split('.') if name else []
      p, s = _lookup(params, path), _lookup(stats, path)
      if isinstance(module, nn.ConvTranspose2d):
        # flax applies the kernel to the dilated input as is; torch applies it flipped.
        module.weight.copy_(tensor(p['kernel']).flip(0, 1).permute(2, 3, 0, 1))
      elif isinstance(module, nn.Conv2d):
        module.weight.copy_(tensor(p['kernel']).permute(3, 2, 0, 1))
      elif isinstance(module, nn.Linear):
        module.weight.copy_(tensor(p['kernel']).T)
      elif isinstance(module, nn.BatchNorm2d):
        module.weight.copy_(tensor(p['scale']))
        module.running_mean.copy_(tensor(s['mean']))
        module.running_var.copy_(tensor(s['var']))
      elif isinstance(module, _Quantizer):
        module.codebook.copy_(tensor(p['codebook']))
        continue
      else:
        continue
      if module.bias is not None:
        module.bias.copy_(tensor(p['bias']))


def _lookup(tree, path):
  for key in path:
    tree = tree.get(key, {})
  return tree
