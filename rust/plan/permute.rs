//! Token permutations (gather indices) and their inverses.
//!
//! A permutation `perm` of a sequence of `N` tokens reads `permuted[i] = original[perm[i]]`; its inverse
//! `inv` satisfies `inv[perm[i]] = i`, so `original[j] = permuted[inv[j]]`. Every order here moves image
//! tokens only: text tokens keep their positions at their end of the sequence.

use super::grid::{GridError, TokenGrid};
use crate::alloc::{self, AllocError};

/// A tile (group) of `frames x height x width` image tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tile {
    pub frames: usize,
    pub height: usize,
    pub width: usize,
}

impl Tile {
    pub fn new(frames: usize, height: usize, width: usize) -> Result<Self, GridError> {
        for (name, value) in [("tile frames", frames), ("tile height", height), ("tile width", width)] {
            if value == 0 {
                return Err(GridError::NonPositive { name });
            }
        }
        Ok(Self { frames, height, width })
    }
}

/// Identity on text tokens; the caller fills the image positions.
fn text_fixed(grid: &TokenGrid) -> Result<Vec<i64>, AllocError> {
    alloc::collect(0..grid.num_tokens() as i64)
}

/// Tile order: tiles in raster order `(tile frame, tile row, tile column)`, tokens inside a tile in raster
/// order `(t, y, x)`. Border tiles of sides that are not multiples of the tile are smaller (ragged).
pub fn tile_order(grid: &TokenGrid, tile: Tile) -> Result<Vec<i64>, AllocError> {
    let mut perm = text_fixed(grid)?;
    let mut slot = grid.image_start();
    for t0 in (0..grid.frames).step_by(tile.frames) {
        for y0 in (0..grid.height).step_by(tile.height) {
            for x0 in (0..grid.width).step_by(tile.width) {
                for t in t0..t0.saturating_add(tile.frames).min(grid.frames) {
                    for y in y0..y0.saturating_add(tile.height).min(grid.height) {
                        for x in x0..x0.saturating_add(tile.width).min(grid.width) {
                            perm[slot] = grid.image_index(t, y, x) as i64;
                            slot += 1;
                        }
                    }
                }
            }
        }
    }
    Ok(perm)
}

/// Group-major order (GRAT): every group contiguous, groups and tokens inside a group in raster order.
/// It is the tile order with the group as the tile.
pub fn group_order(grid: &TokenGrid, group: Tile) -> Result<Vec<i64>, AllocError> {
    tile_order(grid, group)
}

/// Spreads the low 32 bits of `v` to the even bit positions of a `u64`.
fn spread_bits(v: u64) -> u64 {
    let mut v = v & 0xffff_ffff;
    v = (v | (v << 16)) & 0x0000_ffff_0000_ffff;
    v = (v | (v << 8)) & 0x00ff_00ff_00ff_00ff;
    v = (v | (v << 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    v = (v | (v << 2)) & 0x3333_3333_3333_3333;
    v = (v | (v << 1)) & 0x5555_5555_5555_5555;
    v
}

/// Morton code of `(y, x)`: x's bits at even positions, y's at odd positions.
pub fn morton(y: usize, x: usize) -> u64 {
    spread_bits(x as u64) | (spread_bits(y as u64) << 1)
}

/// Z-order (LLSA): per frame (frames outermost), image tokens sorted by the Morton code of `(y, x)`.
/// Grids whose sides are not powers of two keep the relative Z-order of the codes inside the grid.
pub fn zorder(grid: &TokenGrid) -> Result<Vec<i64>, AllocError> {
    let mut perm = text_fixed(grid)?;
    let mut keyed: Vec<(u64, usize)> = alloc::with_capacity(grid.height * grid.width)?;
    for y in 0..grid.height {
        for x in 0..grid.width {
            keyed.push((morton(y, x), y * grid.width + x));
        }
    }
    // Codes are distinct, so an unstable sort is deterministic.
    keyed.sort_unstable_by_key(|&(code, _)| code);
    let frame_tokens = grid.height * grid.width;
    let mut slot = grid.image_start();
    for t in 0..grid.frames {
        for &(_, offset) in &keyed {
            perm[slot] = (grid.image_start() + t * frame_tokens + offset) as i64;
            slot += 1;
        }
    }
    Ok(perm)
}

/// The inverse of a permutation, `None` when `perm` is not a permutation of `0..perm.len()`.
pub fn inverse(perm: &[i64]) -> Result<Option<Vec<i64>>, AllocError> {
    let mut inv = alloc::filled(perm.len(), -1i64)?;
    for (i, &p) in perm.iter().enumerate() {
        let Some(slot) = usize::try_from(p).ok().and_then(|p| inv.get_mut(p)) else { return Ok(None) };
        if *slot != -1 {
            return Ok(None);
        }
        *slot = i as i64;
    }
    Ok(Some(inv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::grid::TextPosition;

    fn grid(f: usize, h: usize, w: usize, t: usize, pos: TextPosition) -> TokenGrid {
        TokenGrid::new(f, h, w, t, pos).unwrap()
    }

    fn is_permutation(p: &[i64]) -> bool {
        inverse(p).unwrap().is_some()
    }

    #[test]
    fn tile_order_small_ragged() {
        // 3x5 grid, 2x2 tiles: tiles (0,0),(0,1),(0,2),(1,0),(1,1),(1,2).
        let g = grid(1, 3, 5, 0, TextPosition::First);
        let p = tile_order(&g, Tile::new(1, 2, 2).unwrap()).unwrap();
        assert_eq!(p, vec![0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]);
    }

    #[test]
    fn text_stays_at_its_end() {
        for pos in [TextPosition::First, TextPosition::Last] {
            let g = grid(2, 5, 7, 4, pos);
            for p in [tile_order(&g, Tile::new(1, 2, 3).unwrap()).unwrap(), zorder(&g).unwrap(), group_order(&g, Tile::new(2, 4, 4).unwrap()).unwrap()] {
                assert!(is_permutation(&p));
                for i in 0..g.text_tokens {
                    let s = g.text_start() + i;
                    assert_eq!(p[s], s as i64);
                }
            }
        }
    }

    #[test]
    fn zorder_power_of_two_forms_squares() {
        let g = grid(1, 8, 8, 0, TextPosition::First);
        let p = zorder(&g).unwrap();
        // The first 16 tokens are the top-left 4x4 square.
        let mut first: Vec<i64> = p[..16].to_vec();
        first.sort();
        let expect: Vec<i64> = (0..4).flat_map(|y| (0..4).map(move |x| y * 8 + x)).collect();
        assert_eq!(first, expect);
        assert_eq!(&p[..4], &[0, 1, 8, 9]);
    }

    #[test]
    fn zorder_non_power_of_two_skips_outside_codes() {
        let g = grid(2, 3, 3, 0, TextPosition::First);
        let p = zorder(&g).unwrap();
        assert_eq!(&p[..9], &[0, 1, 3, 4, 2, 5, 6, 7, 8]);
        assert_eq!(&p[9..], &[9, 10, 12, 13, 11, 14, 15, 16, 17]);
    }

    #[test]
    fn inverse_round_trips_and_rejects() {
        let g = grid(3, 7, 5, 3, TextPosition::Last);
        let p = tile_order(&g, Tile::new(2, 3, 2).unwrap()).unwrap();
        let inv = inverse(&p).unwrap().unwrap();
        for (i, &q) in p.iter().enumerate() {
            assert_eq!(inv[q as usize], i as i64);
        }
        assert!(inverse(&[0, 0]).unwrap().is_none());
        assert!(inverse(&[0, 2]).unwrap().is_none());
        assert!(inverse(&[-1]).unwrap().is_none());
    }

    #[test]
    fn whole_grid_tile_is_identity() {
        let g = grid(2, 6, 4, 5, TextPosition::First);
        let p = tile_order(&g, Tile::new(2, 6, 4).unwrap()).unwrap();
        assert_eq!(p, (0..g.num_tokens() as i64).collect::<Vec<_>>());
        let p = tile_order(&g, Tile::new(1, 1, 4).unwrap()).unwrap();
        assert_eq!(p, (0..g.num_tokens() as i64).collect::<Vec<_>>());
    }

    #[test]
    fn morton_bits() {
        assert_eq!(morton(0, 1), 1);
        assert_eq!(morton(1, 0), 2);
        assert_eq!(morton(1, 1), 3);
        assert_eq!(morton(0, 2), 4);
        assert_eq!(morton(3, 3), 15);
    }
}
