//! The per-epoch picture of one validation sample: an animated GIF with one frame per z slice, the
//! input and each target on the top row and the predictions below them (the seed's layout).

use std::borrow::Cow;
use std::path::Path;

use anyhow::{Context, Result, ensure};

/// Gray levels 0..GRAYS; after them a COLOUR_LEVELS^3 colour cube for 3-channel (vector) panels.
const GRAYS: usize = 128;
const COLOUR_LEVELS: usize = 5;
/// 5 frames per second, as the seed writes them.
const FRAME_DELAY_CS: u16 = 20;
/// A gap between panels, in pixels.
const GAP: usize = 2;

/// One panel: a (D, H, W, C) volume shown as gray (C = 1) or as the magnitudes of its three
/// components in red, green and blue (C = 3, e.g. normals).
#[derive(Debug, Clone)]
pub struct Panel {
    pub size: [usize; 3],
    pub channels: usize,
    pub data: Vec<f32>,
    /// The values shown as black and white (gray) or as no and full colour (|component|, from
    /// 0); the panel's own range when None.
    pub range: Option<[f32; 2]>,
}

impl Panel {
    pub fn new(size: [usize; 3], channels: usize, data: Vec<f32>) -> Result<Panel> {
        ensure!(channels == 1 || channels == 3, "GIF panel: {channels} channels; 1 (gray) or 3 (colour)");
        ensure!(
            data.len() == size.iter().product::<usize>() * channels,
            "GIF panel: {} values for size {size:?} x {channels}",
            data.len()
        );
        Ok(Panel { size, channels, data, range: None })
    }

    /// The panel shown on `range`: a prediction on its target's, so a good one looks like it.
    pub fn on(self, range: [f32; 2]) -> Panel {
        Panel { range: Some(range), ..self }
    }

    /// Its own range: finite min and max (gray), or 0 and the largest |component| (colour).
    pub fn own_range(&self) -> [f32; 2] {
        let finite = || self.data.iter().copied().filter(|v| v.is_finite());
        if self.channels == 1 {
            [finite().fold(f32::INFINITY, f32::min), finite().fold(f32::NEG_INFINITY, f32::max)]
        } else {
            [0.0, finite().fold(0.0f32, |m, v| m.max(v.abs()))]
        }
    }

    /// Palette indices of the whole volume. Gray panels are min-max scaled over their range (the
    /// volume's unless given: not per slice, so frames compare); colour panels show |component| /
    /// the range's top.
    fn indices(&self) -> Vec<u8> {
        let [lo, hi] = self.range.unwrap_or_else(|| self.own_range());
        if self.channels == 1 {
            let scale = if hi > lo { (GRAYS - 1) as f32 / (hi - lo) } else { 0.0 };
            self.data
                .iter()
                .map(|&v| (((v - lo) * scale).round().clamp(0.0, (GRAYS - 1) as f32)) as u8)
                .collect()
        } else {
            let max = hi;
            let scale = if max > 0.0 { (COLOUR_LEVELS - 1) as f32 / max } else { 0.0 };
            let level = |v: f32| ((v.abs() * scale).round().clamp(0.0, (COLOUR_LEVELS - 1) as f32)) as usize;
            self.data
                .chunks_exact(3)
                .map(|c| {
                    (GRAYS + (level(c[0]) * COLOUR_LEVELS + level(c[1])) * COLOUR_LEVELS + level(c[2])) as u8
                })
                .collect()
        }
    }
}

fn palette() -> Vec<u8> {
    let mut p = Vec::with_capacity(256 * 3);
    for i in 0..GRAYS {
        let v = (i * 255 / (GRAYS - 1)) as u8;
        p.extend_from_slice(&[v, v, v]);
    }
    let step = |l: usize| (l * 255 / (COLOUR_LEVELS - 1)) as u8;
    for r in 0..COLOUR_LEVELS {
        for g in 0..COLOUR_LEVELS {
            for b in 0..COLOUR_LEVELS {
                p.extend_from_slice(&[step(r), step(g), step(b)]);
            }
        }
    }
    p.resize(256 * 3, 0);
    p
}

/// Encodes the two rows of panels (all of one size) as a GIF, one frame per z slice.
pub fn encode(top: &[Panel], bottom: &[Panel]) -> Result<Vec<u8>> {
    let first = top.first().or(bottom.first()).context("GIF: no panels")?;
    let [d, h, w] = first.size;
    ensure!(
        top.iter().chain(bottom).all(|p| p.size == first.size),
        "GIF: every panel needs the size {:?}",
        first.size
    );
    let cols = top.len().max(bottom.len());
    let (width, height) = (cols * w + (cols - 1) * GAP, 2 * h + GAP);
    ensure!(width <= u16::MAX as usize && height <= u16::MAX as usize, "GIF: {width}x{height} is too large");
    let mut out = Vec::new();
    {
        let mut enc = gif::Encoder::new(&mut out, width as u16, height as u16, &palette())?;
        enc.set_repeat(gif::Repeat::Infinite)?;
        let rows = [top, bottom].map(|row| row.iter().map(Panel::indices).collect::<Vec<_>>());
        let mut pixels = vec![0u8; width * height];
        for z in 0..d {
            for (r, row) in rows.iter().enumerate() {
                for (c, idx) in row.iter().enumerate() {
                    for y in 0..h {
                        let src = (z * h + y) * w;
                        let dst = (r * (h + GAP) + y) * width + c * (w + GAP);
                        pixels[dst..dst + w].copy_from_slice(&idx[src..src + w]);
                    }
                }
            }
            let frame = gif::Frame {
                width: width as u16,
                height: height as u16,
                delay: FRAME_DELAY_CS,
                buffer: Cow::Borrowed(&pixels),
                ..gif::Frame::default()
            };
            enc.write_frame(&frame)?;
        }
    }
    Ok(out)
}

/// Writes the GIF atomically to `path`.
pub fn write(path: &Path, top: &[Panel], bottom: &[Panel]) -> Result<()> {
    let bytes = encode(top, bottom).with_context(|| format!("encoding {}", path.display()))?;
    crate::tensor::io::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panel_on_another_range_scales_as_that_one() {
        let target = Panel::new([1, 1, 3], 1, vec![0.0, 5.0, 10.0]).unwrap();
        assert_eq!(target.indices(), [0, 64, 127]);
        // A prediction of half the contrast: alone it looks as strong, on the target's range not.
        let pred = Panel::new([1, 1, 3], 1, vec![2.5, 5.0, 7.5]).unwrap();
        assert_eq!(pred.indices(), [0, 64, 127]);
        assert_eq!(pred.on(target.own_range()).indices(), [32, 64, 95]);
        // Colour: one unit vector along x at full colour on the range [0, 1].
        let v = Panel::new([1, 1, 1], 3, vec![0.0, 0.0, 0.5]).unwrap().on([0.0, 1.0]);
        assert_eq!(v.indices(), [(GRAYS + 2) as u8]);
    }
}
