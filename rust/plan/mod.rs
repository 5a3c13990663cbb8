//! Plans: token geometry and the orders tokens are attended in.

pub mod grid;
pub mod blocks;
pub mod permute;

pub use grid::{GridError, TextPosition, TokenGrid};
pub use permute::{group_order, inverse, morton, tile_order, zorder, Tile};
