//! Deterministic scene sampling and the train / held-out caption split.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::Scene;

/// Training captions vs. captions held out for evaluation: one caption string in ten, chosen
/// by a fixed hash, never appears in training (its groups do, in other combinations).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    HeldOut,
}

/// The split a caption belongs to.
pub fn split_of(caption: &str) -> Split {
    // FNV-1a: stable across platforms and releases.
    let h = caption.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    if h % 10 == 3 {
        Split::HeldOut
    } else {
        Split::Train
    }
}

/// The random stream of item `index` of `seed`: independent for every `(seed, index)`.
fn rng(seed: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    rng
}

/// Scene `index` of `seed`, from either split.
pub fn scene(seed: u64, index: u64) -> Scene {
    Scene::random(&mut rng(seed, index))
}

/// Scene `index` of `seed` within `split`: scenes are drawn from the item's stream until the
/// caption falls in `split`.
pub fn sample(split: Split, seed: u64, index: u64) -> Scene {
    let mut rng = rng(seed, index);
    loop {
        let scene = Scene::random(&mut rng);
        if split_of(&scene.caption()) == split {
            return scene;
        }
    }
}
