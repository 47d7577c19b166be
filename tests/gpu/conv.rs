//! cuDNN convolution (`ops::conv::cuda`) against the CPU's.

use super::*;
use muscle::ops::conv::{cpu, cuda as cudnn};

// cuDNN convolution against the CPU's im2col + GEMM.

#[cfg(feature = "cudnn")]
#[test]
fn cudnn_convolution_matches_the_cpu_conv() {
    use muscle::kernel_args::ConvShape;
    with_gpu("cudnn_convolution_matches_the_cpu_conv", |gpu| {
        // Both sides sum in f32 in different orders (cuDNN's algorithm vs im2col + GEMM); FMA math
        // only (no TF32), so 1e-4 of the largest magnitude covers sums of up to ~10^4 terms.
        for &(n, stride, pad) in
            &[(1, 1, 0), (1, 1, 1), (1, 2, 0), (1, 2, 1), (64, 1, 0), (64, 1, 1), (64, 2, 0), (64, 2, 1)]
        {
            let s = ConvShape { n, ci: 3, h: 13, w: 11, co: 5, kh: 3, kw: 3, stride, pad };
            let what = format!("conv n {n} stride {stride} pad {pad}");
            let x = randv(s.x_len(), 1.0, 21);
            let w = randv(s.w_len(), 0.5, 22);
            let dy = randv(s.y_len(), 1.0, 23);
            let mut y = vec![0.0; s.y_len()];
            cpu::forward(&s, &x, &w, &mut y, Default::default());
            let (mut dw, mut dx) = (vec![0.0; w.len()], vec![0.0; x.len()]);
            cpu::backward(&s, &x, &w, &dy, &mut dw, Some(&mut dx), Default::default());

            let (xg, wg, dyg) = (up(gpu, &x), up(gpu, &w), up(gpu, &dy));
            let mut yg = zeros(gpu, y.len());
            cudnn::conv_forward(gpu, &s, &xg, &wg, &mut yg).expect("cudnn forward");
            assert_scaled(&format!("{what}: y"), &down(gpu, &yg), &y, 1e-4);
            let mut dxg = zeros(gpu, dx.len());
            cudnn::conv_backward_data(gpu, &s, &wg, &dyg, &mut dxg).expect("cudnn backward-data");
            assert_scaled(&format!("{what}: dx"), &down(gpu, &dxg), &dx, 1e-4);
            let mut dwg = zeros(gpu, dw.len());
            cudnn::conv_backward_filter(gpu, &s, &xg, &dyg, &mut dwg).expect("cudnn backward-filter");
            assert_scaled(&format!("{what}: dw"), &down(gpu, &dwg), &dw, 1e-4);
        }
    });
}
