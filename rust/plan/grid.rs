//! Token geometry of a DiT sequence: optional text tokens on one side of an image/video latent grid.

use std::fmt;

use crate::alloc::AllocError;

/// Where the text tokens sit in the sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TextPosition {
    First,
    Last,
}

/// A grid that cannot describe a sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GridError {
    /// A spatial size that must be positive is zero.
    NonPositive { name: &'static str },
    /// `text_tokens + frames * height * width` overflows `i64`.
    TooLarge,
    /// A side beyond `i32::MAX`: block plans hold `(t, y, x)` as int32.
    SideTooLarge { name: &'static str, value: usize },
    /// The plan's arrays do not fit in memory (the message starts with [`crate::alloc::OUT_OF_MEMORY`]).
    OutOfMemory(AllocError),
}

impl From<AllocError> for GridError {
    fn from(err: AllocError) -> Self {
        GridError::OutOfMemory(err)
    }
}

impl fmt::Display for GridError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GridError::NonPositive { name } => write!(f, "{name} must be a positive integer"),
            GridError::TooLarge => write!(f, "the grid has more tokens than fit in a 64-bit index"),
            GridError::SideTooLarge { name, value } => {
                write!(f, "{name} must be <= {} (block plans hold int32 coordinates), got {value}", i32::MAX)
            }
            GridError::OutOfMemory(err) => err.fmt(f),
        }
    }
}

impl std::error::Error for GridError {}

/// Sequence = `[text][image]` or `[image][text]`; image tokens in raster order `(t, y, x)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TokenGrid {
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    pub text_tokens: usize,
    pub text_position: TextPosition,
}

impl TokenGrid {
    pub fn new(
        frames: usize,
        height: usize,
        width: usize,
        text_tokens: usize,
        text_position: TextPosition,
    ) -> Result<Self, GridError> {
        for (name, value) in [("frames", frames), ("height", height), ("width", width)] {
            if value == 0 {
                return Err(GridError::NonPositive { name });
            }
        }
        let image = frames
            .checked_mul(height)
            .and_then(|n| n.checked_mul(width))
            .ok_or(GridError::TooLarge)?;
        let total = image.checked_add(text_tokens).ok_or(GridError::TooLarge)?;
        if i64::try_from(total).is_err() {
            return Err(GridError::TooLarge);
        }
        Ok(Self { frames, height, width, text_tokens, text_position })
    }

    /// Number of image tokens, `frames * height * width`.
    pub fn image_tokens(&self) -> usize {
        self.frames * self.height * self.width
    }

    /// Total sequence length.
    pub fn num_tokens(&self) -> usize {
        self.image_tokens() + self.text_tokens
    }

    /// Sequence index of the first image token.
    pub fn image_start(&self) -> usize {
        match self.text_position {
            TextPosition::First => self.text_tokens,
            TextPosition::Last => 0,
        }
    }

    /// Sequence index of the first text token.
    pub fn text_start(&self) -> usize {
        match self.text_position {
            TextPosition::First => 0,
            TextPosition::Last => self.image_tokens(),
        }
    }

    /// Sequence index of image token `(t, y, x)`.
    pub fn image_index(&self, t: usize, y: usize, x: usize) -> usize {
        self.image_start() + (t * self.height + y) * self.width + x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_ranges() {
        let g = TokenGrid::new(2, 3, 5, 7, TextPosition::Last).unwrap();
        assert_eq!(g.image_tokens(), 30);
        assert_eq!(g.num_tokens(), 37);
        assert_eq!(g.image_start(), 0);
        assert_eq!(g.text_start(), 30);
        assert_eq!(g.image_index(1, 2, 4), 29);
        let g = TokenGrid::new(1, 3, 5, 7, TextPosition::First).unwrap();
        assert_eq!(g.image_start(), 7);
        assert_eq!(g.text_start(), 0);
        assert_eq!(g.image_index(0, 0, 0), 7);
    }

    #[test]
    fn rejects_empty_and_huge() {
        assert_eq!(
            TokenGrid::new(1, 0, 5, 0, TextPosition::First),
            Err(GridError::NonPositive { name: "height" })
        );
        assert_eq!(
            TokenGrid::new(usize::MAX, 2, 2, 0, TextPosition::First),
            Err(GridError::TooLarge)
        );
    }
}
