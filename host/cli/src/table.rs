//! Aligned plain-text tables for people (`freehint status`, `config show`).

/// `header` and `rows` as left-aligned columns two spaces apart, one line
/// each, ending in a newline; trailing spaces are trimmed.
pub fn aligned<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (cell, w) in cells.iter().zip(widths) {
            l.push_str(cell);
            l.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 2));
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_whatever_the_cell_widths() {
        let t = aligned(
            &["A", "LONGER"],
            &[["xxxxx".into(), "1".into()], ["y".into(), "".into()]],
        );
        assert_eq!(t, "A      LONGER\nxxxxx  1\ny\n");
    }
}
