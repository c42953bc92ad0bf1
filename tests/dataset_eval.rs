//! The procedural dataset is deterministic and its held-out captions never appear in
//! training; the analytic evaluator reads clean and degraded renders correctly.

use image::RgbImage;
use sdserve::dataset::{parse_caption, sample, split_of, Split};
use sdserve::eval::{analyze, score, Accuracy};

#[test]
fn scenes_are_deterministic_and_splits_disjoint() {
    let a = sample(Split::Train, 7, 3);
    let b = sample(Split::Train, 7, 3);
    assert_eq!(a, b);
    assert_eq!(a.render(64).as_raw(), b.render(64).as_raw());
    assert_ne!(sample(Split::Train, 7, 4), a);
    let held: Vec<String> = (0..300).map(|i| sample(Split::HeldOut, 1, i).caption()).collect();
    assert!(held.iter().all(|c| split_of(c) == Split::HeldOut && parse_caption(c).is_some()));
    for i in 0..2000 {
        let c = sample(Split::Train, 2, i).caption();
        assert!(!held.contains(&c), "{c} is in both splits");
    }
}

/// Adds deterministic ±`amp` noise and a 3×3 box blur.
fn degrade(img: &RgbImage, amp: i32) -> RgbImage {
    let (w, h) = img.dimensions();
    let mut state = 12345u32;
    let noisy = RgbImage::from_fn(w, h, |x, y| {
        let p = img.get_pixel(x, y).0;
        image::Rgb(p.map(|v| {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            (v as i32 + (state >> 16) as i32 % (2 * amp + 1) - amp).clamp(0, 255) as u8
        }))
    });
    RgbImage::from_fn(w, h, |x, y| {
        let mut acc = [0u32; 3];
        let mut n = 0;
        for dy in -1i32..=1 {
            for dx in -1i32..=1 {
                let (nx, ny) = (x as i32 + dx, y as i32 + dy);
                if nx >= 0 && ny >= 0 && nx < w as i32 && ny < h as i32 {
                    let p = noisy.get_pixel(nx as u32, ny as u32).0;
                    (0..3).for_each(|c| acc[c] += p[c] as u32);
                    n += 1;
                }
            }
        }
        image::Rgb(acc.map(|v| (v / n) as u8))
    })
}

#[test]
fn evaluator_reads_renders() {
    let mut clean = Accuracy::default();
    let mut degraded = Accuracy::default();
    for i in 0..200 {
        let scene = sample(Split::Train, 11, i);
        let img = scene.render(64);
        clean.add(score(&analyze(&img), &scene.caption()).unwrap());
        degraded.add(score(&analyze(&degrade(&img, 20)), &scene.caption()).unwrap());
    }
    println!("clean: {clean}\ndegraded: {degraded}");
    assert!(clean.count_rate() >= 0.95 && clean.dominant_color_rate() >= 0.95 && clean.shapes_rate() >= 0.9, "{clean}");
    assert!(degraded.count_rate() >= 0.8, "{degraded}");
}
