//! The procedural dataset is deterministic, its captions describe its scenes and its held-out
//! captions never appear in training; the analytic evaluator reads clean and degraded renders,
//! and `sdserve evaluate` reports per image and in total (with the object counter's count).

use image::{Rgb, RgbImage};
use sdserve::dataset::{groups, parse_caption, sample, scene, split_of, total_count, Split};
use sdserve::eval::{analyze, score, Accuracy};

#[test]
fn scenes_are_deterministic_and_independent() {
    for i in 0..20 {
        let (a, b) = (scene(7, i), scene(7, i));
        assert_eq!(a.caption(), b.caption());
        assert_eq!(a.render(64).as_raw(), b.render(64).as_raw());
        assert_eq!(sample(Split::HeldOut, 7, i), sample(Split::HeldOut, 7, i));
    }
    assert_ne!(scene(7, 0), scene(7, 1));
    assert_ne!(scene(7, 0), scene(8, 0));
}

#[test]
fn captions_describe_scenes() {
    for i in 0..500 {
        let s = scene(3, i);
        assert!((1..=4).contains(&s.shapes.len()));
        let parsed = parse_caption(&s.caption()).expect("caption parses");
        assert_eq!(parsed, groups(&s), "{}", s.caption());
        assert_eq!(total_count(&parsed), s.shapes.len());
    }
}

#[test]
fn held_out_captions_never_train() {
    let held: Vec<String> = (0..300).map(|i| sample(Split::HeldOut, 1, i).caption()).collect();
    assert!(held.iter().all(|c| split_of(c) == Split::HeldOut));
    for i in 0..3000 {
        let c = sample(Split::Train, 2, i).caption();
        assert!(split_of(&c) == Split::Train && !held.contains(&c), "{c} is in both splits");
    }
}

/// Adds deterministic noise of ±`amp` per channel, then a `(2k+1)²` box blur.
fn degrade(img: &RgbImage, amp: i32, k: i32) -> RgbImage {
    let (w, h) = img.dimensions();
    let mut state = 12345u32;
    let noisy = RgbImage::from_fn(w, h, |x, y| {
        Rgb(img.get_pixel(x, y).0.map(|v| {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            (v as i32 + (state >> 16) as i32 % (2 * amp + 1) - amp).clamp(0, 255) as u8
        }))
    });
    RgbImage::from_fn(w, h, |x, y| {
        let (mut acc, mut n) = ([0u32; 3], 0);
        for dy in -k..=k {
            for dx in -k..=k {
                let (nx, ny) = (x as i32 + dx, y as i32 + dy);
                if nx >= 0 && ny >= 0 && nx < w as i32 && ny < h as i32 {
                    let p = noisy.get_pixel(nx as u32, ny as u32).0;
                    (0..3).for_each(|c| acc[c] += p[c] as u32);
                    n += 1;
                }
            }
        }
        Rgb(acc.map(|v| (v / n) as u8))
    })
}

/// Accuracy of the evaluator on 200 held-out scenes rendered at `size`, each transformed by `f`.
fn accuracy(size: u32, f: impl Fn(&RgbImage) -> RgbImage) -> Accuracy {
    let mut acc = Accuracy::default();
    for i in 0..200 {
        let s = sample(Split::HeldOut, 11, i);
        acc.add(score(&analyze(&f(&s.render(size))), &s.caption()).expect("caption parses"));
    }
    acc
}

#[test]
fn evaluator_reads_renders() {
    let clean = accuracy(64, RgbImage::clone);
    let large = accuracy(128, RgbImage::clone);
    let mild = accuracy(64, |img| degrade(img, 20, 1));
    let strong = accuracy(64, |img| degrade(img, 40, 2));
    println!("clean 64:   {clean}\nclean 128:  {large}\nmild 64:    {mild}\nstrong 64:  {strong}");
    for a in [clean, large] {
        assert!(a.count_rate() >= 0.95 && a.dominant_color_rate() >= 0.95 && a.shapes_rate() >= 0.9, "{a}");
    }
    assert!(mild.count_rate() >= 0.8 && mild.shapes_rate() >= 0.8, "{mild}");
}

#[test]
fn evaluator_rejects_blank_and_unparsable() {
    let blank = RgbImage::from_pixel(64, 64, Rgb([240, 240, 240]));
    let a = analyze(&blank);
    assert_eq!((a.count(), a.dominant_color), (0, None));
    assert!(score(&a, "a photo of a cat").is_none());
    let m = score(&a, "one red circle").unwrap();
    assert!(!m.count_exact && !m.dominant_color_ok && !m.exact);
}

#[test]
fn evaluate_command_prints_details_and_accuracy() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdserve"))
        .args(["evaluate", "--images", "2", "--steps", "2", "--details", "--counter", "models/rewards/object_count"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("counter agrees with the evaluator's count on"), "{stdout}");
    let lines: Vec<serde_json::Value> = stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    // Two per-image lines (prompt, seed, objects found, match, the counter's count), then the
    // totals.
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (i, line) in lines[..2].iter().enumerate() {
        assert!(parse_caption(line["prompt"].as_str().unwrap()).is_some(), "{line}");
        assert_eq!(line["seed"], 1_000_000 + i as u64);
        assert!(line["found"].is_array() && line["match"]["count_exact"].is_boolean(), "{line}");
        assert!(line["counter"].as_f64().is_some_and(|n| (0.0..=6.0).contains(&n)), "{line}");
    }
    assert_eq!(lines[2]["images"], 2);

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_sdserve")).args(["evaluate", "--images", "0"]).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--images"));
}
