//! The charts' font: DejaVu Sans (Debian/Ubuntu `fonts-dejavu-core`,
//! installed by scripts/install-deps.sh), then where other distributions
//! keep it, registered as plotters' sans-serif.

use plotters::style::FontStyle;

const FONT_FILES: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];
pub const FONT: &str = "sans-serif";

/// Registers DejaVu Sans as plotters' sans-serif font.
pub fn load_font() -> Result<(), String> {
    let (path, bytes) = FONT_FILES
        .iter()
        .find_map(|p| std::fs::read(p).ok().map(|b| (p, b)))
        .ok_or_else(|| {
            format!(
                "no font at {} (apt-get install fonts-dejavu-core)",
                FONT_FILES.join(" or ")
            )
        })?;
    // plotters keeps a 'static reference; the bench exits soon after.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font(FONT, FontStyle::Normal, bytes)
        .map_err(|_| format!("{path} is not a usable TTF font"))
}
