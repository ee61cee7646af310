Disassembly of section .text:

<kiln_v1_rms_norm_norm>:
	ldr	x11, [x0, #24]
	ldr	x9, [x0]
	ldr	x8, [x0, #8]
	ldr	x3, [x0, #32]
	mul	x0, x3, x1
	cbz	x2, <kiln_v1_rms_norm_norm+0x2b8>
	udiv	x10, x0, x2
	add	x0, x1, #0x1
	mul	x0, x3, x0
	cbz	x2, <kiln_v1_rms_norm_norm+0x2bc>
	udiv	x3, x0, x2
	cmp	x10, x3
	b.lt	<kiln_v1_rms_norm_norm+0x38>  // b.tstop
	ret
	mov	x2, #0x0                   	// #0
	movi	v23.16b, #0x0
	cmp	x2, #0x100
	b.lt	<kiln_v1_rms_norm_norm+0x29c>  // b.tstop
	mov	x4, #0x0                   	// #0
	cmp	x4, #0x2
	b.lt	<kiln_v1_rms_norm_norm+0x5c>  // b.tstop
	add	x10, x10, #0x1
	b	<kiln_v1_rms_norm_norm+0x2c>
	ldr	x0, [x11]
	add	x0, x0, x10, lsl #8
	lsl	x7, x4, #7
	add	x5, x0, x4, lsl #7
	ldr	q0, [x0, x7]
	fmov	s1, #1.000000000000000000e+00
	mov	s2, v23.s[1]
	fadd	s2, s23, s2
	mov	s3, v23.s[2]
	mov	s4, v23.s[3]
	fadd	s3, s3, s4
	fadd	s2, s2, s3
	mov	w0, #0x3c800000            	// #1015021568
	fmov	s3, w0
	fmul	s2, s2, s3
	mov	w0, #0xc5ac                	// #50604
	movk	w0, #0x3727, lsl #16
	fmov	s3, w0
	fadd	s2, s2, s3
	fsqrt	s2, s2
	fdiv	s1, s1, s2
	dup	v7.4s, v1.s[0]
	fmul	v0.4s, v0.4s, v7.4s
	add	x6, x8, x4, lsl #7
	ldr	q1, [x8, x7]
	fmul	v0.4s, v0.4s, v1.4s
	fabs	v2.4s, v0.4s
	ldr	q1, [x5, #16]
	fmul	v1.4s, v1.4s, v7.4s
	ldr	q3, [x6, #16]
	fmul	v1.4s, v1.4s, v3.4s
	fabs	v3.4s, v1.4s
	fmax	v3.4s, v2.4s, v3.4s
	ldr	q2, [x5, #32]
	fmul	v2.4s, v2.4s, v7.4s
	ldr	q4, [x6, #32]
	fmul	v2.4s, v2.4s, v4.4s
	fabs	v4.4s, v2.4s
	fmax	v4.4s, v3.4s, v4.4s
	ldr	q3, [x5, #48]
	fmul	v3.4s, v3.4s, v7.4s
	ldr	q5, [x6, #48]
	fmul	v3.4s, v3.4s, v5.4s
	fabs	v5.4s, v3.4s
	fmax	v5.4s, v4.4s, v5.4s
	ldr	q4, [x5, #64]
	fmul	v4.4s, v4.4s, v7.4s
	ldr	q6, [x6, #64]
	fmul	v4.4s, v4.4s, v6.4s
	fabs	v6.4s, v4.4s
	fmax	v6.4s, v5.4s, v6.4s
	ldr	q5, [x5, #80]
	fmul	v5.4s, v5.4s, v7.4s
	ldr	q16, [x6, #80]
	fmul	v5.4s, v5.4s, v16.4s
	fabs	v16.4s, v5.4s
	fmax	v16.4s, v6.4s, v16.4s
	ldr	q6, [x5, #96]
	fmul	v6.4s, v6.4s, v7.4s
	ldr	q17, [x6, #96]
	fmul	v6.4s, v6.4s, v17.4s
	fabs	v17.4s, v6.4s
	fmax	v16.4s, v16.4s, v17.4s
	ldr	q17, [x5, #112]
	fmul	v7.4s, v17.4s, v7.4s
	ldr	q17, [x6, #112]
	fmul	v7.4s, v7.4s, v17.4s
	fabs	v17.4s, v7.4s
	fmax	v16.4s, v16.4s, v17.4s
	mov	s17, v16.s[1]
	fmax	s17, s16, s17
	mov	s18, v16.s[2]
	mov	s16, v16.s[3]
	fmax	s16, s18, s16
	fmax	s17, s17, s16
	mov	w0, #0xfe00                	// #65024
	movk	w0, #0x46ff, lsl #16
	fmov	s18, w0
	fdiv	s16, s17, s18
	mov	x0, #0x90                  	// #144
	madd	x5, x10, x0, x9
	mov	x0, #0x48                  	// #72
	mul	x6, x4, x0
	madd	x7, x4, x0, x5
	str	s16, [x5, x6]
	movi	v19.2s, #0x0
	fdiv	s18, s18, s17
	fcmp	s17, s19
	fcsel	s17, s18, s19, gt
	dup	v17.4s, v17.s[0]
	fmul	v0.4s, v0.4s, v17.4s
	frintn	v0.4s, v0.4s
	fcvtzs	v0.4s, v0.4s
	fmul	v1.4s, v1.4s, v17.4s
	frintn	v1.4s, v1.4s
	fcvtzs	v1.4s, v1.4s
	add	v18.4s, v0.4s, v1.4s
	fmul	v2.4s, v2.4s, v17.4s
	frintn	v2.4s, v2.4s
	fcvtzs	v2.4s, v2.4s
	add	v18.4s, v18.4s, v2.4s
	fmul	v3.4s, v3.4s, v17.4s
	frintn	v3.4s, v3.4s
	fcvtzs	v3.4s, v3.4s
	add	v18.4s, v18.4s, v3.4s
	fmul	v4.4s, v4.4s, v17.4s
	frintn	v4.4s, v4.4s
	fcvtzs	v4.4s, v4.4s
	add	v18.4s, v18.4s, v4.4s
	fmul	v5.4s, v5.4s, v17.4s
	frintn	v5.4s, v5.4s
	fcvtzs	v5.4s, v5.4s
	add	v18.4s, v18.4s, v5.4s
	fmul	v6.4s, v6.4s, v17.4s
	frintn	v6.4s, v6.4s
	fcvtzs	v6.4s, v6.4s
	add	v18.4s, v18.4s, v6.4s
	fmul	v7.4s, v7.4s, v17.4s
	frintn	v7.4s, v7.4s
	fcvtzs	v7.4s, v7.4s
	add	v17.4s, v18.4s, v7.4s
	addv	s17, v17.4s
	mov	w0, v17.s[0]
	scvtf	s17, w0
	fmul	s16, s17, s16
	str	s16, [x7, #4]
	sqxtn	v0.4h, v0.4s
	sqxtn2	v0.8h, v1.4s
	add	x0, x5, #0x8
	str	q0, [x0, x6]
	sqxtn	v0.4h, v2.4s
	sqxtn2	v0.8h, v3.4s
	add	x0, x5, #0x18
	str	q0, [x0, x6]
	sqxtn	v0.4h, v4.4s
	sqxtn2	v0.8h, v5.4s
	add	x0, x5, #0x28
	str	q0, [x0, x6]
	sqxtn	v0.4h, v6.4s
	sqxtn2	v0.8h, v7.4s
	add	x0, x5, #0x38
	str	q0, [x0, x6]
	add	x4, x4, #0x1
	b	<kiln_v1_rms_norm_norm+0x4c>
	add	x1, x2, #0x10
	ldr	x0, [x11]
	add	x0, x0, x10, lsl #8
	ldr	q0, [x0, x2]
	fmla	v23.4s, v0.4s, v0.4s
	mov	x2, x1
	b	<kiln_v1_rms_norm_norm+0x40>
	udf	#49439
	udf	#49439

<kiln_v2_matmul_q4>:
	stp	x29, x30, [sp, #-16]!
	mov	x29, sp
	stp	x20, x21, [sp, #-16]!
	stp	d12, d13, [sp, #-16]!
	stp	d10, d11, [sp, #-16]!
	stp	d8, d9, [sp, #-16]!
	ldr	x21, [x0]
	ldr	x20, [x0, #8]
	ldr	x15, [x0, #32]
	lsl	x0, x1, #4
	cbz	x2, <kiln_v2_matmul_q4+0x884>
	udiv	x3, x0, x2
	add	x0, x1, #0x1
	lsl	x0, x0, #4
	cbz	x2, <kiln_v2_matmul_q4+0x888>
	udiv	x4, x0, x2
	mov	x14, #0x0                   	// #0
	cmp	x14, x15
	b.lt	<kiln_v2_matmul_q4+0x64>  // b.tstop
	ldp	d8, d9, [sp], #16
	ldp	d10, d11, [sp], #16
	ldp	d12, d13, [sp], #16
	ldp	x20, x21, [sp], #16
	ldp	x29, x30, [sp], #16
	ret
	mov	x5, x3
	cmp	x5, x4
	b.lt	<kiln_v2_matmul_q4+0x78>  // b.tstop
	add	x14, x14, #0x40
	b	<kiln_v2_matmul_q4+0x44>
	add	x0, x14, #0x40
	cmp	x0, x15
	csel	x6, x0, x15, lt	// lt = tstop
	sub	x0, x6, x14
	and	x0, x0, #0x1
	sub	x7, x6, x0
	mov	x8, x14
	cmp	x8, x7
	b.lt	<kiln_v2_matmul_q4+0x3c0>  // b.tstop
	cmp	x7, x6
	b.lt	<kiln_v2_matmul_q4+0xac>  // b.tstop
	add	x5, x5, #0x1
	b	<kiln_v2_matmul_q4+0x68>
	mov	x8, #0x0                   	// #0
	movi	v0.16b, #0x0
	mov	x0, #0x90                  	// #144
	madd	x9, x7, x0, x21
	add	x0, x20, #0x100
	mov	x1, #0xa0                  	// #160
	madd	x10, x5, x1, x0
	mov	v2.16b, v0.16b
	cmp	x8, #0x2
	b.lt	<kiln_v2_matmul_q4+0x1cc>  // b.tstop
	fneg	v3.4s, v2.4s
	mov	w0, #0x999a                	// #39322
	movk	w0, #0xc2ae, lsl #16
	dup	v5.4s, w0
	fcmgt	v1.4s, v5.4s, v3.4s
	mov	w0, #0x6967                	// #26983
	movk	w0, #0x3950, lsl #16
	dup	v4.4s, w0
	fmax	v3.4s, v3.4s, v5.4s
	mov	w0, #0x999a                	// #39322
	movk	w0, #0x42b0, lsl #16
	dup	v5.4s, w0
	fmin	v28.4s, v3.4s, v5.4s
	mov	w0, #0xaa3b                	// #43579
	movk	w0, #0x3fb8, lsl #16
	dup	v3.4s, w0
	fmul	v3.4s, v28.4s, v3.4s
	frintn	v3.4s, v3.4s
	mov	w0, #0x8083                	// #32899
	movk	w0, #0x395e, lsl #16
	dup	v5.4s, w0
	mov	w0, #0x8000                	// #32768
	movk	w0, #0xbf31, lsl #16
	dup	v6.4s, w0
	fmla	v28.4s, v3.4s, v6.4s
	fmla	v28.4s, v3.4s, v5.4s
	mov	w0, #0x43ce                	// #17358
	movk	w0, #0x3ab7, lsl #16
	dup	v5.4s, w0
	fmla	v5.4s, v4.4s, v28.4s
	mov	w0, #0x8908                	// #35080
	movk	w0, #0x3c08, lsl #16
	dup	v4.4s, w0
	fmla	v4.4s, v5.4s, v28.4s
	mov	w0, #0xa9c1                	// #43457
	movk	w0, #0x3d2a, lsl #16
	dup	v5.4s, w0
	fmla	v5.4s, v4.4s, v28.4s
	mov	w0, #0xaaaa                	// #43690
	movk	w0, #0x3e2a, lsl #16
	dup	v4.4s, w0
	fmla	v4.4s, v5.4s, v28.4s
	movi	v5.4s, #0x3f, lsl #24
	fmla	v5.4s, v4.4s, v28.4s
	fmul	v7.4s, v28.4s, v28.4s
	fmov	v4.4s, #1.000000000000000000e+00
	fadd	v6.4s, v28.4s, v4.4s
	fmla	v6.4s, v5.4s, v7.4s
	fcvtzs	v3.4s, v3.4s
	movi	v5.4s, #0x7f
	add	v3.4s, v3.4s, v5.4s
	shl	v3.4s, v3.4s, #23
	fmul	v3.4s, v6.4s, v3.4s
	bsl	v1.16b, v0.16b, v3.16b
	fadd	v0.4s, v1.4s, v4.4s
	fdiv	v0.4s, v2.4s, v0.4s
	add	x1, x21, #0x480
	lsl	x0, x7, #8
	add	x0, x0, x5, lsl #4
	str	q0, [x1, x0]
	add	x7, x7, #0x1
	b	<kiln_v2_matmul_q4+0x9c>
	add	x8, x8, #0x1
	ldr	x0, [x10, #8]
	fmov	d1, x0
	sxtl	v1.4s, v1.4h
	shl	v1.4s, v1.4s, #13
	mvni	v4.4s, #0x70, lsl #24
	and	v1.16b, v1.16b, v4.16b
	mov	x0, #0x77800000            	// #2004877312
	dup	v5.4s, w0
	fmul	v1.4s, v1.4s, v5.4s
	ldr	s3, [x9, #4]
	ldr	q17, [x10, #16]
	movi	v6.16b, #0xf
	and	v16.16b, v17.16b, v6.16b
	uxtl	v18.8h, v16.8b
	ldur	q7, [x9, #8]
	smull	v19.4s, v18.4h, v7.4h
	smull2	v18.4s, v18.8h, v7.8h
	addp	v18.4s, v19.4s, v18.4s
	uxtl2	v19.8h, v16.16b
	ldur	q16, [x9, #24]
	smull	v20.4s, v19.4h, v16.4h
	smull2	v19.4s, v19.8h, v16.8h
	addp	v19.4s, v20.4s, v19.4s
	add	v18.4s, v18.4s, v19.4s
	ushr	v17.8h, v17.8h, #4
	and	v19.16b, v17.16b, v6.16b
	uxtl	v20.8h, v19.8b
	ldur	q17, [x9, #40]
	smull	v21.4s, v20.4h, v17.4h
	smull2	v20.4s, v20.8h, v17.8h
	addp	v20.4s, v21.4s, v20.4s
	add	v20.4s, v18.4s, v20.4s
	uxtl2	v19.8h, v19.16b
	ldur	q18, [x9, #56]
	smull	v21.4s, v19.4h, v18.4h
	smull2	v19.4s, v19.8h, v18.8h
	addp	v19.4s, v21.4s, v19.4s
	add	v19.4s, v20.4s, v19.4s
	ldr	q20, [x10, #32]
	and	v21.16b, v20.16b, v6.16b
	uxtl	v22.8h, v21.8b
	smull	v23.4s, v22.4h, v7.4h
	smull2	v22.4s, v22.8h, v7.8h
	addp	v22.4s, v23.4s, v22.4s
	uxtl2	v21.8h, v21.16b
	smull	v23.4s, v21.4h, v16.4h
	smull2	v21.4s, v21.8h, v16.8h
	addp	v21.4s, v23.4s, v21.4s
	add	v21.4s, v22.4s, v21.4s
	ushr	v20.8h, v20.8h, #4
	and	v20.16b, v20.16b, v6.16b
	uxtl	v22.8h, v20.8b
	smull	v23.4s, v22.4h, v17.4h
	smull2	v22.4s, v22.8h, v17.8h
	addp	v22.4s, v23.4s, v22.4s
	add	v21.4s, v21.4s, v22.4s
	uxtl2	v20.8h, v20.16b
	smull	v22.4s, v20.4h, v18.4h
	smull2	v20.4s, v20.8h, v18.8h
	addp	v20.4s, v22.4s, v20.4s
	add	v20.4s, v21.4s, v20.4s
	addp	v19.4s, v19.4s, v20.4s
	ldr	q20, [x10, #48]
	and	v21.16b, v20.16b, v6.16b
	uxtl	v22.8h, v21.8b
	smull	v23.4s, v22.4h, v7.4h
	smull2	v22.4s, v22.8h, v7.8h
	addp	v22.4s, v23.4s, v22.4s
	uxtl2	v21.8h, v21.16b
	smull	v23.4s, v21.4h, v16.4h
	smull2	v21.4s, v21.8h, v16.8h
	addp	v21.4s, v23.4s, v21.4s
	add	v21.4s, v22.4s, v21.4s
	ushr	v20.8h, v20.8h, #4
	and	v20.16b, v20.16b, v6.16b
	uxtl	v22.8h, v20.8b
	smull	v23.4s, v22.4h, v17.4h
	smull2	v22.4s, v22.8h, v17.8h
	addp	v22.4s, v23.4s, v22.4s
	add	v21.4s, v21.4s, v22.4s
	uxtl2	v20.8h, v20.16b
	smull	v22.4s, v20.4h, v18.4h
	smull2	v20.4s, v20.8h, v18.8h
	addp	v20.4s, v22.4s, v20.4s
	add	v20.4s, v21.4s, v20.4s
	ldr	q21, [x10, #64]
	and	v22.16b, v21.16b, v6.16b
	uxtl	v23.8h, v22.8b
	smull	v24.4s, v23.4h, v7.4h
	smull2	v7.4s, v23.8h, v7.8h
	addp	v7.4s, v24.4s, v7.4s
	uxtl2	v22.8h, v22.16b
	smull	v23.4s, v22.4h, v16.4h
	smull2	v16.4s, v22.8h, v16.8h
	addp	v16.4s, v23.4s, v16.4s
	add	v7.4s, v7.4s, v16.4s
	ushr	v16.8h, v21.8h, #4
	and	v6.16b, v16.16b, v6.16b
	uxtl	v16.8h, v6.8b
	smull	v21.4s, v16.4h, v17.4h
	smull2	v16.4s, v16.8h, v17.8h
	addp	v16.4s, v21.4s, v16.4s
	add	v7.4s, v7.4s, v16.4s
	uxtl2	v6.8h, v6.16b
	smull	v16.4s, v6.4h, v18.4h
	smull2	v6.4s, v6.8h, v18.8h
	addp	v6.4s, v16.4s, v6.4s
	add	v6.4s, v7.4s, v6.4s
	addp	v6.4s, v20.4s, v6.4s
	addp	v6.4s, v19.4s, v6.4s
	scvtf	v6.4s, v6.4s
	ldr	x0, [x10]
	fmov	d7, x0
	sxtl	v7.4s, v7.4h
	shl	v7.4s, v7.4s, #13
	and	v4.16b, v7.16b, v4.16b
	fmul	v4.4s, v4.4s, v5.4s
	ld1r	{v5.4s}, [x9]
	fmul	v4.4s, v4.4s, v5.4s
	fmla	v2.4s, v6.4s, v4.4s
	fmla	v2.4s, v1.4s, v3.s[0]
	add	x9, x9, #0x48
	add	x10, x10, #0x50
	b	<kiln_v2_matmul_q4+0xcc>
	mov	x10, #0x0                   	// #0
	movi	v0.16b, #0x0
	mov	x1, #0x90                  	// #144
	madd	x11, x8, x1, x21
	add	x9, x8, #0x1
	madd	x12, x9, x1, x21
	add	x0, x20, #0x100
	mov	x1, #0xa0                  	// #160
	madd	x13, x5, x1, x0
	mov	v2.16b, v0.16b
	mov	v3.16b, v0.16b
	cmp	x10, #0x2
	b.lt	<kiln_v2_matmul_q4+0x568>  // b.tstop
	fneg	v5.4s, v2.4s
	mov	w0, #0x999a                	// #39322
	movk	w0, #0xc2ae, lsl #16
	dup	v4.4s, w0
	fcmgt	v6.4s, v4.4s, v5.4s
	mov	w0, #0x6967                	// #26983
	movk	w0, #0x3950, lsl #16
	dup	v1.4s, w0
	fmax	v7.4s, v5.4s, v4.4s
	mov	w0, #0x999a                	// #39322
	movk	w0, #0x42b0, lsl #16
	dup	v5.4s, w0
	fmin	v22.4s, v7.4s, v5.4s
	mov	w0, #0xaa3b                	// #43579
	movk	w0, #0x3fb8, lsl #16
	dup	v7.4s, w0
	fmul	v16.4s, v22.4s, v7.4s
	frintn	v25.4s, v16.4s
	mov	w0, #0x8083                	// #32899
	movk	w0, #0x395e, lsl #16
	dup	v16.4s, w0
	mov	w0, #0x8000                	// #32768
	movk	w0, #0xbf31, lsl #16
	dup	v17.4s, w0
	fmla	v22.4s, v25.4s, v17.4s
	fmla	v22.4s, v25.4s, v16.4s
	mov	w0, #0x43ce                	// #17358
	movk	w0, #0x3ab7, lsl #16
	dup	v18.4s, w0
	mov	v20.16b, v18.16b
	fmla	v20.4s, v1.4s, v22.4s
	mov	w0, #0x8908                	// #35080
	movk	w0, #0x3c08, lsl #16
	dup	v19.4s, w0
	mov	v23.16b, v19.16b
	fmla	v23.4s, v20.4s, v22.4s
	mov	w0, #0xa9c1                	// #43457
	movk	w0, #0x3d2a, lsl #16
	dup	v21.4s, w0
	mov	v20.16b, v21.16b
	fmla	v20.4s, v23.4s, v22.4s
	mov	w0, #0xaaaa                	// #43690
	movk	w0, #0x3e2a, lsl #16
	dup	v24.4s, w0
	mov	v26.16b, v24.16b
	fmla	v26.4s, v20.4s, v22.4s
	movi	v23.4s, #0x3f, lsl #24
	mov	v27.16b, v23.16b
	fmla	v27.4s, v26.4s, v22.4s
	fmul	v28.4s, v22.4s, v22.4s
	fmov	v20.4s, #1.000000000000000000e+00
	fadd	v26.4s, v22.4s, v20.4s
	fmla	v26.4s, v27.4s, v28.4s
	fcvtzs	v25.4s, v25.4s
	movi	v22.4s, #0x7f
	add	v25.4s, v25.4s, v22.4s
	shl	v25.4s, v25.4s, #23
	fmul	v25.4s, v26.4s, v25.4s
	bsl	v6.16b, v0.16b, v25.16b
	fadd	v6.4s, v6.4s, v20.4s
	fdiv	v2.4s, v2.4s, v6.4s
	add	x10, x21, #0x480
	lsl	x0, x8, #8
	add	x0, x0, x5, lsl #4
	str	q2, [x10, x0]
	fneg	v2.4s, v3.4s
	fcmgt	v29.4s, v4.4s, v2.4s
	fmax	v2.4s, v2.4s, v4.4s
	fmin	v4.4s, v2.4s, v5.4s
	fmul	v2.4s, v4.4s, v7.4s
	frintn	v2.4s, v2.4s
	fmla	v4.4s, v2.4s, v17.4s
	fmla	v4.4s, v2.4s, v16.4s
	fmla	v18.4s, v1.4s, v4.4s
	fmla	v19.4s, v18.4s, v4.4s
	fmla	v21.4s, v19.4s, v4.4s
	fmla	v24.4s, v21.4s, v4.4s
	fmla	v23.4s, v24.4s, v4.4s
	fmul	v5.4s, v4.4s, v4.4s
	fadd	v1.4s, v4.4s, v20.4s
	fmla	v1.4s, v23.4s, v5.4s
	fcvtzs	v2.4s, v2.4s
	add	v2.4s, v2.4s, v22.4s
	shl	v2.4s, v2.4s, #23
	fmul	v1.4s, v1.4s, v2.4s
	bsl	v29.16b, v0.16b, v1.16b
	fadd	v0.4s, v29.4s, v20.4s
	fdiv	v0.4s, v3.4s, v0.4s
	lsl	x0, x9, #8
	add	x0, x0, x5, lsl #4
	str	q0, [x10, x0]
	add	x8, x8, #0x2
	b	<kiln_v2_matmul_q4+0x94>
	add	x10, x10, #0x1
	ldr	x0, [x13, #8]
	fmov	d1, x0
	sxtl	v1.4s, v1.4h
	shl	v1.4s, v1.4s, #13
	mvni	v5.4s, #0x70, lsl #24
	and	v1.16b, v1.16b, v5.16b
	mov	x0, #0x77800000            	// #2004877312
	dup	v16.4s, w0
	fmul	v1.4s, v1.4s, v16.4s
	ldr	s4, [x11, #4]
	ldr	q17, [x13, #16]
	movi	v27.16b, #0xf
	and	v7.16b, v17.16b, v27.16b
	uxtl	v6.8h, v7.8b
	ldur	q29, [x11, #8]
	smull	v18.4s, v6.4h, v29.4h
	smull2	v19.4s, v6.8h, v29.8h
	addp	v18.4s, v18.4s, v19.4s
	uxtl2	v7.8h, v7.16b
	ldur	q30, [x11, #24]
	smull	v19.4s, v7.4h, v30.4h
	smull2	v20.4s, v7.8h, v30.8h
	addp	v19.4s, v19.4s, v20.4s
	add	v18.4s, v18.4s, v19.4s
	ushr	v17.8h, v17.8h, #4
	and	v19.16b, v17.16b, v27.16b
	uxtl	v17.8h, v19.8b
	ldur	q31, [x11, #40]
	smull	v20.4s, v17.4h, v31.4h
	smull2	v21.4s, v17.8h, v31.8h
	addp	v20.4s, v20.4s, v21.4s
	add	v20.4s, v18.4s, v20.4s
	uxtl2	v18.8h, v19.16b
	ldur	q8, [x11, #56]
	smull	v19.4s, v18.4h, v8.4h
	smull2	v21.4s, v18.8h, v8.8h
	addp	v19.4s, v19.4s, v21.4s
	add	v23.4s, v20.4s, v19.4s
	ldr	q21, [x13, #32]
	and	v20.16b, v21.16b, v27.16b
	uxtl	v19.8h, v20.8b
	smull	v22.4s, v19.4h, v29.4h
	smull2	v24.4s, v19.8h, v29.8h
	addp	v22.4s, v22.4s, v24.4s
	uxtl2	v20.8h, v20.16b
	smull	v24.4s, v20.4h, v30.4h
	smull2	v25.4s, v20.8h, v30.8h
	addp	v24.4s, v24.4s, v25.4s
	add	v22.4s, v22.4s, v24.4s
	ushr	v21.8h, v21.8h, #4
	and	v24.16b, v21.16b, v27.16b
	uxtl	v21.8h, v24.8b
	smull	v25.4s, v21.4h, v31.4h
	smull2	v26.4s, v21.8h, v31.8h
	addp	v25.4s, v25.4s, v26.4s
	add	v25.4s, v22.4s, v25.4s
	uxtl2	v22.8h, v24.16b
	smull	v24.4s, v22.4h, v8.4h
	smull2	v26.4s, v22.8h, v8.8h
	addp	v24.4s, v24.4s, v26.4s
	add	v24.4s, v25.4s, v24.4s
	addp	v9.4s, v23.4s, v24.4s
	ldr	q25, [x13, #48]
	and	v24.16b, v25.16b, v27.16b
	uxtl	v23.8h, v24.8b
	smull	v26.4s, v23.4h, v29.4h
	smull2	v28.4s, v23.8h, v29.8h
	addp	v26.4s, v26.4s, v28.4s
	uxtl2	v24.8h, v24.16b
	smull	v28.4s, v24.4h, v30.4h
	smull2	v10.4s, v24.8h, v30.8h
	addp	v28.4s, v28.4s, v10.4s
	add	v26.4s, v26.4s, v28.4s
	ushr	v25.8h, v25.8h, #4
	and	v28.16b, v25.16b, v27.16b
	uxtl	v25.8h, v28.8b
	smull	v10.4s, v25.4h, v31.4h
	smull2	v11.4s, v25.8h, v31.8h
	addp	v10.4s, v10.4s, v11.4s
	add	v10.4s, v26.4s, v10.4s
	uxtl2	v26.8h, v28.16b
	smull	v28.4s, v26.4h, v8.4h
	smull2	v11.4s, v26.8h, v8.8h
	addp	v28.4s, v28.4s, v11.4s
	add	v10.4s, v10.4s, v28.4s
	ldr	q11, [x13, #64]
	and	v12.16b, v11.16b, v27.16b
	uxtl	v28.8h, v12.8b
	smull	v13.4s, v28.4h, v29.4h
	smull2	v29.4s, v28.8h, v29.8h
	addp	v13.4s, v13.4s, v29.4s
	uxtl2	v29.8h, v12.16b
	smull	v12.4s, v29.4h, v30.4h
	smull2	v30.4s, v29.8h, v30.8h
	addp	v30.4s, v12.4s, v30.4s
	add	v30.4s, v13.4s, v30.4s
	ushr	v11.8h, v11.8h, #4
	and	v11.16b, v11.16b, v27.16b
	uxtl	v27.8h, v11.8b
	smull	v12.4s, v27.4h, v31.4h
	smull2	v31.4s, v27.8h, v31.8h
	addp	v31.4s, v12.4s, v31.4s
	add	v31.4s, v30.4s, v31.4s
	uxtl2	v30.8h, v11.16b
	smull	v11.4s, v30.4h, v8.4h
	smull2	v8.4s, v30.8h, v8.8h
	addp	v8.4s, v11.4s, v8.4s
	add	v31.4s, v31.4s, v8.4s
	addp	v31.4s, v10.4s, v31.4s
	addp	v31.4s, v9.4s, v31.4s
	scvtf	v31.4s, v31.4s
	ldr	x0, [x13]
	fmov	d8, x0
	sxtl	v8.4s, v8.4h
	shl	v8.4s, v8.4s, #13
	and	v5.16b, v8.16b, v5.16b
	fmul	v5.4s, v5.4s, v16.4s
	ld1r	{v16.4s}, [x11]
	fmul	v16.4s, v5.4s, v16.4s
	fmla	v2.4s, v31.4s, v16.4s
	fmla	v2.4s, v1.4s, v4.s[0]
	ldr	s4, [x12, #4]
	ldur	q16, [x12, #8]
	smull	v31.4s, v6.4h, v16.4h
	smull2	v6.4s, v6.8h, v16.8h
	addp	v31.4s, v31.4s, v6.4s
	ldur	q6, [x12, #24]
	smull	v8.4s, v7.4h, v6.4h
	smull2	v7.4s, v7.8h, v6.8h
	addp	v7.4s, v8.4s, v7.4s
	add	v31.4s, v31.4s, v7.4s
	ldur	q7, [x12, #40]
	smull	v8.4s, v17.4h, v7.4h
	smull2	v17.4s, v17.8h, v7.8h
	addp	v17.4s, v8.4s, v17.4s
	add	v31.4s, v31.4s, v17.4s
	ldur	q17, [x12, #56]
	smull	v8.4s, v18.4h, v17.4h
	smull2	v18.4s, v18.8h, v17.8h
	addp	v18.4s, v8.4s, v18.4s
	add	v18.4s, v31.4s, v18.4s
	smull	v31.4s, v19.4h, v16.4h
	smull2	v19.4s, v19.8h, v16.8h
	addp	v19.4s, v31.4s, v19.4s
	smull	v31.4s, v20.4h, v6.4h
	smull2	v20.4s, v20.8h, v6.8h
	addp	v20.4s, v31.4s, v20.4s
	add	v19.4s, v19.4s, v20.4s
	smull	v20.4s, v21.4h, v7.4h
	smull2	v21.4s, v21.8h, v7.8h
	addp	v20.4s, v20.4s, v21.4s
	add	v19.4s, v19.4s, v20.4s
	smull	v20.4s, v22.4h, v17.4h
	smull2	v21.4s, v22.8h, v17.8h
	addp	v20.4s, v20.4s, v21.4s
	add	v19.4s, v19.4s, v20.4s
	addp	v18.4s, v18.4s, v19.4s
	smull	v19.4s, v23.4h, v16.4h
	smull2	v20.4s, v23.8h, v16.8h
	addp	v19.4s, v19.4s, v20.4s
	smull	v20.4s, v24.4h, v6.4h
	smull2	v21.4s, v24.8h, v6.8h
	addp	v20.4s, v20.4s, v21.4s
	add	v19.4s, v19.4s, v20.4s
	smull	v20.4s, v25.4h, v7.4h
	smull2	v21.4s, v25.8h, v7.8h
	addp	v20.4s, v20.4s, v21.4s
	add	v19.4s, v19.4s, v20.4s
	smull	v20.4s, v26.4h, v17.4h
	smull2	v21.4s, v26.8h, v17.8h
	addp	v20.4s, v20.4s, v21.4s
	add	v19.4s, v19.4s, v20.4s
	smull	v20.4s, v28.4h, v16.4h
	smull2	v16.4s, v28.8h, v16.8h
	addp	v16.4s, v20.4s, v16.4s
	smull	v20.4s, v29.4h, v6.4h
	smull2	v6.4s, v29.8h, v6.8h
	addp	v6.4s, v20.4s, v6.4s
	add	v6.4s, v16.4s, v6.4s
	smull	v16.4s, v27.4h, v7.4h
	smull2	v7.4s, v27.8h, v7.8h
	addp	v7.4s, v16.4s, v7.4s
	add	v6.4s, v6.4s, v7.4s
	smull	v7.4s, v30.4h, v17.4h
	smull2	v16.4s, v30.8h, v17.8h
	addp	v7.4s, v7.4s, v16.4s
	add	v6.4s, v6.4s, v7.4s
	addp	v6.4s, v19.4s, v6.4s
	addp	v6.4s, v18.4s, v6.4s
	scvtf	v6.4s, v6.4s
	ld1r	{v7.4s}, [x12]
	fmul	v5.4s, v5.4s, v7.4s
	fmla	v3.4s, v6.4s, v5.4s
	fmla	v3.4s, v1.4s, v4.s[0]
	add	x11, x11, #0x48
	add	x12, x12, #0x48
	add	x13, x13, #0x50
	b	<kiln_v2_matmul_q4+0x3ec>
	udf	#49439
	udf	#49439

<kiln_v3_matmul_q8>:
	stp	x29, x30, [sp, #-16]!
	mov	x29, sp
	stp	x19, x20, [sp, #-16]!
	ldr	x20, [x0]
	ldr	x19, [x0, #8]
	ldr	x15, [x0, #32]
	lsl	x0, x1, #4
	cbz	x2, <kiln_v3_matmul_q8+0x5c4>
	udiv	x3, x0, x2
	add	x0, x1, #0x1
	lsl	x0, x0, #4
	cbz	x2, <kiln_v3_matmul_q8+0x5c8>
	udiv	x4, x0, x2
	mov	x14, #0x0                   	// #0
	cmp	x14, x15
	b.lt	<kiln_v3_matmul_q8+0x4c>  // b.tstop
	ldp	x19, x20, [sp], #16
	ldp	x29, x30, [sp], #16
	ret
	mov	x5, x3
	cmp	x5, x4
	b.lt	<kiln_v3_matmul_q8+0x60>  // b.tstop
	add	x14, x14, #0x40
	b	<kiln_v3_matmul_q8+0x38>
	add	x0, x14, #0x40
	cmp	x0, x15
	csel	x6, x0, x15, lt	// lt = tstop
	sub	x0, x6, x14
	and	x0, x0, #0x1
	sub	x7, x6, x0
	mov	x8, x14
	cmp	x8, x7
	b.lt	<kiln_v3_matmul_q8+0x28c>  // b.tstop
	cmp	x7, x6
	b.lt	<kiln_v3_matmul_q8+0x94>  // b.tstop
	add	x5, x5, #0x1
	b	<kiln_v3_matmul_q8+0x50>
	mov	x8, #0x0                   	// #0
	movi	v0.16b, #0x0
	mov	x1, #0x90                  	// #144
	madd	x9, x7, x1, x20
	add	x1, x19, #0xb00
	mov	x2, #0x110                 	// #272
	madd	x10, x5, x2, x1
	cmp	x8, #0x2
	b.lt	<kiln_v3_matmul_q8+0xdc>  // b.tstop
	add	x9, x20, #0x480
	lsl	x8, x7, #8
	add	x8, x8, x5, lsl #4
	ldr	q4, [x9, x8]
	fmul	v4.4s, v0.4s, v4.4s
	add	x9, x20, #0xc80
	str	q4, [x9, x8]
	add	x7, x7, #0x1
	b	<kiln_v3_matmul_q8+0x84>
	add	x8, x8, #0x1
	ldur	q7, [x10, #8]
	sxtl	v16.8h, v7.8b
	ldur	q6, [x9, #8]
	smull	v17.4s, v16.4h, v6.4h
	smull2	v16.4s, v16.8h, v6.8h
	addp	v16.4s, v17.4s, v16.4s
	sxtl2	v17.8h, v7.16b
	ldur	q7, [x9, #24]
	smull	v18.4s, v17.4h, v7.4h
	smull2	v17.4s, v17.8h, v7.8h
	addp	v17.4s, v18.4s, v17.4s
	add	v17.4s, v16.4s, v17.4s
	ldur	q18, [x10, #24]
	sxtl	v19.8h, v18.8b
	ldur	q16, [x9, #40]
	smull	v20.4s, v19.4h, v16.4h
	smull2	v19.4s, v19.8h, v16.8h
	addp	v19.4s, v20.4s, v19.4s
	add	v19.4s, v17.4s, v19.4s
	sxtl2	v18.8h, v18.16b
	ldur	q17, [x9, #56]
	smull	v20.4s, v18.4h, v17.4h
	smull2	v18.4s, v18.8h, v17.8h
	addp	v18.4s, v20.4s, v18.4s
	add	v18.4s, v19.4s, v18.4s
	ldur	q19, [x10, #40]
	sxtl	v20.8h, v19.8b
	smull	v21.4s, v20.4h, v6.4h
	smull2	v20.4s, v20.8h, v6.8h
	addp	v20.4s, v21.4s, v20.4s
	sxtl2	v19.8h, v19.16b
	smull	v21.4s, v19.4h, v7.4h
	smull2	v19.4s, v19.8h, v7.8h
	addp	v19.4s, v21.4s, v19.4s
	add	v19.4s, v20.4s, v19.4s
	ldur	q20, [x10, #56]
	sxtl	v21.8h, v20.8b
	smull	v22.4s, v21.4h, v16.4h
	smull2	v21.4s, v21.8h, v16.8h
	addp	v21.4s, v22.4s, v21.4s
	add	v19.4s, v19.4s, v21.4s
	sxtl2	v20.8h, v20.16b
	smull	v21.4s, v20.4h, v17.4h
	smull2	v20.4s, v20.8h, v17.8h
	addp	v20.4s, v21.4s, v20.4s
	add	v19.4s, v19.4s, v20.4s
	addp	v18.4s, v18.4s, v19.4s
	ldur	q19, [x10, #72]
	sxtl	v20.8h, v19.8b
	smull	v21.4s, v20.4h, v6.4h
	smull2	v20.4s, v20.8h, v6.8h
	addp	v20.4s, v21.4s, v20.4s
	sxtl2	v19.8h, v19.16b
	smull	v21.4s, v19.4h, v7.4h
	smull2	v19.4s, v19.8h, v7.8h
	addp	v19.4s, v21.4s, v19.4s
	add	v19.4s, v20.4s, v19.4s
	ldur	q20, [x10, #88]
	sxtl	v21.8h, v20.8b
	smull	v22.4s, v21.4h, v16.4h
	smull2	v21.4s, v21.8h, v16.8h
	addp	v21.4s, v22.4s, v21.4s
	add	v19.4s, v19.4s, v21.4s
	sxtl2	v20.8h, v20.16b
	smull	v21.4s, v20.4h, v17.4h
	smull2	v20.4s, v20.8h, v17.8h
	addp	v20.4s, v21.4s, v20.4s
	add	v19.4s, v19.4s, v20.4s
	ldur	q20, [x10, #104]
	sxtl	v21.8h, v20.8b
	smull	v22.4s, v21.4h, v6.4h
	smull2	v6.4s, v21.8h, v6.8h
	addp	v6.4s, v22.4s, v6.4s
	sxtl2	v20.8h, v20.16b
	smull	v21.4s, v20.4h, v7.4h
	smull2	v7.4s, v20.8h, v7.8h
	addp	v7.4s, v21.4s, v7.4s
	add	v6.4s, v6.4s, v7.4s
	ldur	q7, [x10, #120]
	sxtl	v20.8h, v7.8b
	smull	v21.4s, v20.4h, v16.4h
	smull2	v16.4s, v20.8h, v16.8h
	addp	v16.4s, v21.4s, v16.4s
	add	v6.4s, v6.4s, v16.4s
	sxtl2	v7.8h, v7.16b
	smull	v16.4s, v7.4h, v17.4h
	smull2	v7.4s, v7.8h, v17.8h
	addp	v7.4s, v16.4s, v7.4s
	add	v6.4s, v6.4s, v7.4s
	addp	v6.4s, v19.4s, v6.4s
	addp	v6.4s, v18.4s, v6.4s
	scvtf	v6.4s, v6.4s
	ldr	x11, [x10]
	fmov	d7, x11
	sxtl	v7.4s, v7.4h
	shl	v7.4s, v7.4s, #13
	mvni	v16.4s, #0x70, lsl #24
	and	v7.16b, v7.16b, v16.16b
	mov	x11, #0x77800000            	// #2004877312
	dup	v16.4s, w11
	fmul	v7.4s, v7.4s, v16.4s
	ld1r	{v16.4s}, [x9]
	fmul	v7.4s, v7.4s, v16.4s
	fmla	v0.4s, v6.4s, v7.4s
	add	x9, x9, #0x48
	add	x10, x10, #0x88
	b	<kiln_v3_matmul_q8+0xb0>
	mov	x10, #0x0                   	// #0
	movi	v0.16b, #0x0
	mov	x12, #0x90                  	// #144
	madd	x11, x8, x12, x20
	add	x9, x8, #0x1
	madd	x12, x9, x12, x20
	add	x13, x19, #0xb00
	mov	x0, #0x110                 	// #272
	madd	x13, x5, x0, x13
	mov	v1.16b, v0.16b
	cmp	x10, #0x2
	b.lt	<kiln_v3_matmul_q8+0x2f4>  // b.tstop
	add	x10, x20, #0x480
	lsl	x11, x8, #8
	add	x12, x11, x5, lsl #4
	ldr	q16, [x10, x12]
	fmul	v16.4s, v0.4s, v16.4s
	add	x11, x20, #0xc80
	str	q16, [x11, x12]
	lsl	x12, x9, #8
	add	x12, x12, x5, lsl #4
	ldr	q16, [x10, x12]
	fmul	v16.4s, v1.4s, v16.4s
	str	q16, [x11, x12]
	add	x8, x8, #0x2
	b	<kiln_v3_matmul_q8+0x7c>
	add	x10, x10, #0x1
	ldur	q17, [x13, #8]
	sxtl	v16.8h, v17.8b
	ldur	q29, [x11, #8]
	smull	v18.4s, v16.4h, v29.4h
	smull2	v19.4s, v16.8h, v29.8h
	addp	v18.4s, v18.4s, v19.4s
	sxtl2	v17.8h, v17.16b
	ldur	q30, [x11, #24]
	smull	v19.4s, v17.4h, v30.4h
	smull2	v20.4s, v17.8h, v30.8h
	addp	v19.4s, v19.4s, v20.4s
	add	v19.4s, v18.4s, v19.4s
	ldur	q20, [x13, #24]
	sxtl	v18.8h, v20.8b
	ldur	q31, [x11, #40]
	smull	v21.4s, v18.4h, v31.4h
	smull2	v22.4s, v18.8h, v31.8h
	addp	v21.4s, v21.4s, v22.4s
	add	v21.4s, v19.4s, v21.4s
	sxtl2	v19.8h, v20.16b
	ldur	q2, [x11, #56]
	smull	v20.4s, v19.4h, v2.4h
	smull2	v22.4s, v19.8h, v2.8h
	addp	v20.4s, v20.4s, v22.4s
	add	v24.4s, v21.4s, v20.4s
	ldur	q21, [x13, #40]
	sxtl	v20.8h, v21.8b
	smull	v22.4s, v20.4h, v29.4h
	smull2	v23.4s, v20.8h, v29.8h
	addp	v22.4s, v22.4s, v23.4s
	sxtl2	v21.8h, v21.16b
	smull	v23.4s, v21.4h, v30.4h
	smull2	v25.4s, v21.8h, v30.8h
	addp	v23.4s, v23.4s, v25.4s
	add	v23.4s, v22.4s, v23.4s
	ldur	q25, [x13, #56]
	sxtl	v22.8h, v25.8b
	smull	v26.4s, v22.4h, v31.4h
	smull2	v27.4s, v22.8h, v31.8h
	addp	v26.4s, v26.4s, v27.4s
	add	v26.4s, v23.4s, v26.4s
	sxtl2	v23.8h, v25.16b
	smull	v25.4s, v23.4h, v2.4h
	smull2	v27.4s, v23.8h, v2.8h
	addp	v25.4s, v25.4s, v27.4s
	add	v25.4s, v26.4s, v25.4s
	addp	v3.4s, v24.4s, v25.4s
	ldur	q25, [x13, #72]
	sxtl	v24.8h, v25.8b
	smull	v26.4s, v24.4h, v29.4h
	smull2	v27.4s, v24.8h, v29.8h
	addp	v26.4s, v26.4s, v27.4s
	sxtl2	v25.8h, v25.16b
	smull	v27.4s, v25.4h, v30.4h
	smull2	v28.4s, v25.8h, v30.8h
	addp	v27.4s, v27.4s, v28.4s
	add	v27.4s, v26.4s, v27.4s
	ldur	q28, [x13, #88]
	sxtl	v26.8h, v28.8b
	smull	v4.4s, v26.4h, v31.4h
	smull2	v5.4s, v26.8h, v31.8h
	addp	v4.4s, v4.4s, v5.4s
	add	v4.4s, v27.4s, v4.4s
	sxtl2	v27.8h, v28.16b
	smull	v28.4s, v27.4h, v2.4h
	smull2	v5.4s, v27.8h, v2.8h
	addp	v28.4s, v28.4s, v5.4s
	add	v4.4s, v4.4s, v28.4s
	ldur	q5, [x13, #104]
	sxtl	v28.8h, v5.8b
	smull	v6.4s, v28.4h, v29.4h
	smull2	v29.4s, v28.8h, v29.8h
	addp	v6.4s, v6.4s, v29.4s
	sxtl2	v29.8h, v5.16b
	smull	v5.4s, v29.4h, v30.4h
	smull2	v30.4s, v29.8h, v30.8h
	addp	v30.4s, v5.4s, v30.4s
	add	v5.4s, v6.4s, v30.4s
	ldur	q6, [x13, #120]
	sxtl	v30.8h, v6.8b
	smull	v7.4s, v30.4h, v31.4h
	smull2	v31.4s, v30.8h, v31.8h
	addp	v31.4s, v7.4s, v31.4s
	add	v5.4s, v5.4s, v31.4s
	sxtl2	v31.8h, v6.16b
	smull	v6.4s, v31.4h, v2.4h
	smull2	v2.4s, v31.8h, v2.8h
	addp	v2.4s, v6.4s, v2.4s
	add	v2.4s, v5.4s, v2.4s
	addp	v2.4s, v4.4s, v2.4s
	addp	v2.4s, v3.4s, v2.4s
	scvtf	v3.4s, v2.4s
	ldr	x0, [x13]
	fmov	d2, x0
	sxtl	v2.4s, v2.4h
	shl	v2.4s, v2.4s, #13
	mvni	v4.4s, #0x70, lsl #24
	and	v2.16b, v2.16b, v4.16b
	mov	x0, #0x77800000            	// #2004877312
	dup	v4.4s, w0
	fmul	v2.4s, v2.4s, v4.4s
	ld1r	{v4.4s}, [x11]
	fmul	v4.4s, v2.4s, v4.4s
	fmla	v0.4s, v3.4s, v4.4s
	ldur	q3, [x12, #8]
	smull	v4.4s, v16.4h, v3.4h
	smull2	v16.4s, v16.8h, v3.8h
	addp	v4.4s, v4.4s, v16.4s
	ldur	q16, [x12, #24]
	smull	v5.4s, v17.4h, v16.4h
	smull2	v17.4s, v17.8h, v16.8h
	addp	v17.4s, v5.4s, v17.4s
	add	v4.4s, v4.4s, v17.4s
	ldur	q17, [x12, #40]
	smull	v5.4s, v18.4h, v17.4h
	smull2	v18.4s, v18.8h, v17.8h
	addp	v18.4s, v5.4s, v18.4s
	add	v4.4s, v4.4s, v18.4s
	ldur	q18, [x12, #56]
	smull	v5.4s, v19.4h, v18.4h
	smull2	v19.4s, v19.8h, v18.8h
	addp	v19.4s, v5.4s, v19.4s
	add	v19.4s, v4.4s, v19.4s
	smull	v4.4s, v20.4h, v3.4h
	smull2	v20.4s, v20.8h, v3.8h
	addp	v20.4s, v4.4s, v20.4s
	smull	v4.4s, v21.4h, v16.4h
	smull2	v21.4s, v21.8h, v16.8h
	addp	v21.4s, v4.4s, v21.4s
	add	v20.4s, v20.4s, v21.4s
	smull	v21.4s, v22.4h, v17.4h
	smull2	v22.4s, v22.8h, v17.8h
	addp	v21.4s, v21.4s, v22.4s
	add	v20.4s, v20.4s, v21.4s
	smull	v21.4s, v23.4h, v18.4h
	smull2	v22.4s, v23.8h, v18.8h
	addp	v21.4s, v21.4s, v22.4s
	add	v20.4s, v20.4s, v21.4s
	addp	v19.4s, v19.4s, v20.4s
	smull	v20.4s, v24.4h, v3.4h
	smull2	v21.4s, v24.8h, v3.8h
	addp	v20.4s, v20.4s, v21.4s
	smull	v21.4s, v25.4h, v16.4h
	smull2	v22.4s, v25.8h, v16.8h
	addp	v21.4s, v21.4s, v22.4s
	add	v20.4s, v20.4s, v21.4s
	smull	v21.4s, v26.4h, v17.4h
	smull2	v22.4s, v26.8h, v17.8h
	addp	v21.4s, v21.4s, v22.4s
	add	v20.4s, v20.4s, v21.4s
	smull	v21.4s, v27.4h, v18.4h
	smull2	v22.4s, v27.8h, v18.8h
	addp	v21.4s, v21.4s, v22.4s
	add	v20.4s, v20.4s, v21.4s
	smull	v21.4s, v28.4h, v3.4h
	smull2	v22.4s, v28.8h, v3.8h
	addp	v21.4s, v21.4s, v22.4s
	smull	v22.4s, v29.4h, v16.4h
	smull2	v16.4s, v29.8h, v16.8h
	addp	v16.4s, v22.4s, v16.4s
	add	v16.4s, v21.4s, v16.4s
	smull	v21.4s, v30.4h, v17.4h
	smull2	v17.4s, v30.8h, v17.8h
	addp	v17.4s, v21.4s, v17.4s
	add	v16.4s, v16.4s, v17.4s
	smull	v17.4s, v31.4h, v18.4h
	smull2	v18.4s, v31.8h, v18.8h
	addp	v17.4s, v17.4s, v18.4s
	add	v16.4s, v16.4s, v17.4s
	addp	v16.4s, v20.4s, v16.4s
	addp	v16.4s, v19.4s, v16.4s
	scvtf	v16.4s, v16.4s
	ld1r	{v17.4s}, [x12]
	fmul	v17.4s, v2.4s, v17.4s
	fmla	v1.4s, v16.4s, v17.4s
	add	x11, x11, #0x48
	add	x12, x12, #0x48
	add	x13, x13, #0x88
	b	<kiln_v3_matmul_q8+0x2b4>
	udf	#49439
	udf	#49439

<kiln_v4_rope>:
	ldr	x12, [x0]
	ldr	x11, [x0, #8]
	ldr	x9, [x0, #40]
	ldr	x3, [x0, #32]
	mul	x0, x3, x1
	cbz	x2, <kiln_v4_rope+0xf0>
	udiv	x10, x0, x2
	add	x0, x1, #0x1
	mul	x0, x3, x0
	cbz	x2, <kiln_v4_rope+0xf4>
	udiv	x3, x0, x2
	cmp	x10, x3
	b.lt	<kiln_v4_rope+0x38>  // b.tstop
	ret
	mov	x4, #0x0                   	// #0
	cmp	x4, #0x4
	b.lt	<kiln_v4_rope+0x4c>  // b.tstop
	add	x10, x10, #0x1
	b	<kiln_v4_rope+0x2c>
	add	x0, x12, #0xc80
	add	x0, x0, x10, lsl #8
	lsl	x8, x4, #6
	add	x5, x0, x4, lsl #6
	ldr	q0, [x0, x8]
	mov	x0, #0x1c00                	// #7168
	add	x1, x11, x0
	add	x0, x9, x10
	lsl	x2, x0, #7
	add	x6, x1, x0, lsl #7
	ldr	q1, [x1, x2]
	rev64	v2.4s, v0.4s
	ldr	q3, [x6, #64]
	fmul	v2.4s, v2.4s, v3.4s
	fmla	v2.4s, v0.4s, v1.4s
	add	x0, x12, x10, lsl #8
	add	x7, x0, x4, lsl #6
	str	q2, [x0, x8]
	ldr	q0, [x5, #16]
	ldr	q1, [x6, #16]
	rev64	v2.4s, v0.4s
	ldr	q3, [x6, #80]
	fmul	v2.4s, v2.4s, v3.4s
	fmla	v2.4s, v0.4s, v1.4s
	str	q2, [x7, #16]
	ldr	q1, [x5, #32]
	ldr	q2, [x6, #32]
	rev64	v3.4s, v1.4s
	ldr	q4, [x6, #96]
	fmul	v0.4s, v3.4s, v4.4s
	fmla	v0.4s, v1.4s, v2.4s
	str	q0, [x7, #32]
	ldr	q2, [x5, #48]
	ldr	q3, [x6, #48]
	rev64	v4.4s, v2.4s
	ldr	q5, [x6, #112]
	fmul	v1.4s, v4.4s, v5.4s
	fmla	v1.4s, v2.4s, v3.4s
	str	q1, [x7, #48]
	add	x4, x4, #0x1
	b	<kiln_v4_rope+0x3c>
	udf	#49439
	udf	#49439

<kiln_v5_kv_store>:
	ldr	x11, [x0]
	ldr	x9, [x0, #16]
	ldr	x8, [x0, #40]
	ldr	x3, [x0, #32]
	mul	x0, x3, x1
	cbz	x2, <kiln_v5_kv_store+0x11c>
	udiv	x10, x0, x2
	add	x0, x1, #0x1
	mul	x0, x3, x0
	cbz	x2, <kiln_v5_kv_store+0x120>
	udiv	x3, x0, x2
	cmp	x10, x3
	b.lt	<kiln_v5_kv_store+0x38>  // b.tstop
	ret
	lsl	x0, x10, #8
	add	x6, x11, x10, lsl #8
	ldr	q0, [x11, x0]
	add	x4, x8, x10
	lsl	x5, x4, #8
	add	x7, x9, x4, lsl #8
	str	q0, [x9, x5]
	ldr	q1, [x6, #16]
	str	q1, [x7, #16]
	ldr	q2, [x6, #32]
	str	q2, [x7, #32]
	ldr	q3, [x6, #48]
	str	q3, [x7, #48]
	ldr	q4, [x6, #64]
	str	q4, [x7, #64]
	ldr	q5, [x6, #80]
	str	q5, [x7, #80]
	ldr	q6, [x6, #96]
	str	q6, [x7, #96]
	ldr	q7, [x6, #112]
	str	q7, [x7, #112]
	ldr	q16, [x6, #128]
	str	q16, [x7, #128]
	ldr	q17, [x6, #144]
	str	q17, [x7, #144]
	ldr	q18, [x6, #160]
	str	q18, [x7, #160]
	ldr	q19, [x6, #176]
	str	q19, [x7, #176]
	ldr	q20, [x6, #192]
	str	q20, [x7, #192]
	ldr	q21, [x6, #208]
	str	q21, [x7, #208]
	ldr	q22, [x6, #224]
	str	q22, [x7, #224]
	ldr	q23, [x6, #240]
	str	q23, [x7, #240]
	add	x0, x9, #0x4, lsl #12
	add	x4, x0, x4, lsl #8
	str	q0, [x0, x5]
	str	q1, [x4, #16]
	str	q2, [x4, #32]
	str	q3, [x4, #48]
	str	q4, [x4, #64]
	str	q5, [x4, #80]
	str	q6, [x4, #96]
	str	q7, [x4, #112]
	str	q16, [x4, #128]
	str	q17, [x4, #144]
	str	q18, [x4, #160]
	str	q19, [x4, #176]
	str	q20, [x4, #192]
	str	q21, [x4, #208]
	str	q22, [x4, #224]
	str	q23, [x4, #240]
	add	x10, x10, #0x1
	b	<kiln_v5_kv_store+0x2c>
	udf	#49439
	udf	#49439

<kiln_v5_attend>:
	stp	x29, x30, [sp, #-16]!
	mov	x29, sp
	str	x27, [sp, #-16]!
	stp	x25, x26, [sp, #-16]!
	stp	x23, x24, [sp, #-16]!
	stp	x21, x22, [sp, #-16]!
	stp	x19, x20, [sp, #-16]!
	sub	sp, sp, #0x140
	ldr	x26, [x0]
	ldr	x3, [x0, #24]
	ldr	x4, [x0, #48]
	ldr	x5, [x0, #16]
	ldr	x6, [x0, #40]
	ldr	x0, [x0, #32]
	sub	x7, x0, x4
	lsl	x0, x7, #2
	sub	x0, x0, x1
	add	x0, x0, x2
	sub	x0, x0, #0x1
	cbz	x2, <kiln_v5_attend+0x764>
	cmn	x2, #0x1
	ccmp	x0, #0x1, #0x0, eq	// eq = none
	b.vs	<kiln_v5_attend+0x768>
	sdiv	x8, x0, x2
	mov	x9, #0x0                   	// #0
	cmp	x9, x8
	b.lt	<kiln_v5_attend+0x8c>  // b.tstop
	add	sp, sp, #0x140
	ldp	x19, x20, [sp], #16
	ldp	x21, x22, [sp], #16
	ldp	x23, x24, [sp], #16
	ldp	x25, x26, [sp], #16
	ldr	x27, [sp], #16
	ldp	x29, x30, [sp], #16
	ret
	madd	x0, x9, x2, x1
	cbz	x7, <kiln_v5_attend+0x76c>
	udiv	x10, x0, x7
	cbz	x7, <kiln_v5_attend+0x770>
	udiv	x11, x0, x7
	msub	x11, x11, x7, x0
	mov	x12, #0x0                   	// #0
	cmp	x12, #0x0
	b.le	<kiln_v5_attend+0x710>
	mov	x12, #0x0                   	// #0
	add	x11, x11, x4
	add	x13, x6, x11
	add	x0, x13, #0x40
	lsr	x14, x0, #6
	cmp	x12, x14
	b.lt	<kiln_v5_attend+0x148>  // b.tstop
	mov	x12, #0x0                   	// #0
	cmp	x12, #0x0
	b.le	<kiln_v5_attend+0xe0>
	add	x9, x9, #0x1
	b	<kiln_v5_attend+0x64>
	ldr	x0, [x3, #8]
	sub	x0, x0, x4, lsl #8
	add	x0, x0, x11, lsl #8
	add	x14, x0, x10, lsl #6
	lsl	x15, x12, #6
	add	x13, x14, x12, lsl #6
	ldr	q1, [x14, x15]
	fmov	s0, #1.000000000000000000e+00
	add	x0, sp, #0x110
	add	x0, x0, x12, lsl #2
	ldr	s2, [x0, #12]
	fdiv	s0, s0, s2
	dup	v0.4s, v0.s[0]
	fmul	v1.4s, v1.4s, v0.4s
	str	q1, [x14, x15]
	ldr	q1, [x13, #16]
	fmul	v1.4s, v1.4s, v0.4s
	str	q1, [x13, #16]
	ldr	q1, [x13, #32]
	fmul	v1.4s, v1.4s, v0.4s
	str	q1, [x13, #32]
	ldr	q1, [x13, #48]
	fmul	v0.4s, v1.4s, v0.4s
	str	q0, [x13, #48]
	add	x12, x12, #0x1
	b	<kiln_v5_attend+0xd0>
	mov	x15, #0x0                   	// #0
	cmp	x15, #0x0
	b.le	<kiln_v5_attend+0x514>
	mov	x15, #0x0                   	// #0
	cmp	x15, #0x0
	b.le	<kiln_v5_attend+0x250>
	mov	x15, #0x0                   	// #0
	cmp	x15, #0x0
	b.le	<kiln_v5_attend+0x174>
	add	x12, x12, #0x1
	b	<kiln_v5_attend+0xc4>
	mov	x20, #0x0                   	// #0
	movi	v1.16b, #0x0
	add	x0, x13, #0x1
	sub	x0, x0, x12, lsl #6
	mov	x19, #0x40                  	// #64
	cmp	x0, x19
	csel	x19, x0, x19, lt	// lt = tstop
	mov	v0.16b, v1.16b
	mov	v2.16b, v1.16b
	mov	v3.16b, v1.16b
	cmp	x20, x19
	b.lt	<kiln_v5_attend+0x200>  // b.tstop
	ldr	x0, [x3, #8]
	sub	x0, x0, x4, lsl #8
	add	x0, x0, x11, lsl #8
	add	x20, x0, x10, lsl #6
	lsl	x21, x15, #6
	add	x19, x20, x15, lsl #6
	ldr	q5, [x20, x21]
	add	x0, sp, #0x110
	add	x0, x0, x15, lsl #2
	ldr	s4, [x0, #24]
	fmla	v1.4s, v5.4s, v4.s[0]
	str	q1, [x20, x21]
	ldr	q1, [x19, #16]
	fmla	v3.4s, v1.4s, v4.s[0]
	str	q3, [x19, #16]
	ldr	q3, [x19, #32]
	fmla	v2.4s, v3.4s, v4.s[0]
	str	q2, [x19, #32]
	ldr	q3, [x19, #48]
	fmla	v0.4s, v3.4s, v4.s[0]
	str	q0, [x19, #48]
	add	x15, x15, #0x1
	b	<kiln_v5_attend+0x164>
	add	x21, x20, #0x1
	add	x0, x5, #0x4, lsl #12
	add	x0, x0, x10, lsl #6
	add	x0, x0, x12, lsl #14
	lsl	x23, x20, #8
	add	x22, x0, x20, lsl #8
	ldr	q6, [x0, x23]
	mov	x0, sp
	mov	x23, #0x110                 	// #272
	madd	x0, x15, x23, x0
	ldr	s5, [x0, x20, lsl #2]
	fmla	v1.4s, v6.4s, v5.s[0]
	ldr	q6, [x22, #16]
	fmla	v3.4s, v6.4s, v5.s[0]
	ldr	q6, [x22, #32]
	fmla	v2.4s, v6.4s, v5.s[0]
	ldr	q6, [x22, #48]
	fmla	v0.4s, v6.4s, v5.s[0]
	mov	x20, x21
	b	<kiln_v5_attend+0x19c>
	mov	w0, #0xff800000            	// #-8388608
	fmov	s7, w0
	mov	x0, sp
	mov	x19, #0x110                 	// #272
	madd	x19, x15, x19, x0
	add	x0, x13, #0x1
	sub	x0, x0, x12, lsl #6
	mov	x20, #0x40                  	// #64
	cmp	x0, x20
	csel	x20, x0, x20, lt	// lt = tstop
	add	x0, x19, x20, lsl #2
	str	s7, [x19, x20, lsl #2]
	str	s7, [x0, #4]
	str	s7, [x0, #8]
	mov	x21, #0x0                   	// #0
	mvni	v1.4s, #0x7f, msl #16
	add	x0, x20, #0x3
	lsr	x20, x0, #2
	cmp	x21, x20
	b.lt	<kiln_v5_attend+0x500>  // b.tstop
	mov	x21, #0x0                   	// #0
	movi	v16.16b, #0x0
	mov	v0.16b, v16.16b
	cmp	x21, x20
	b.lt	<kiln_v5_attend+0x3ec>  // b.tstop
	add	x20, sp, #0x110
	add	x19, x20, x15, lsl #2
	ldr	s18, [x20, x15, lsl #2]
	mov	s17, v1.s[1]
	fmax	s17, s1, s17
	mov	s19, v1.s[2]
	mov	s20, v1.s[3]
	fmax	s19, s19, s20
	fmax	s17, s17, s19
	fmax	s19, s18, s17
	str	s19, [x20, x15, lsl #2]
	ldr	s17, [x19, #12]
	fsub	s18, s18, s19
	dup	v18.4s, v18.s[0]
	mov	w0, #0x999a                	// #39322
	movk	w0, #0xc2ae, lsl #16
	dup	v20.4s, w0
	fcmgt	v31.4s, v20.4s, v18.4s
	mov	w0, #0x6967                	// #26983
	movk	w0, #0x3950, lsl #16
	dup	v19.4s, w0
	fmax	v18.4s, v18.4s, v20.4s
	mov	w0, #0x999a                	// #39322
	movk	w0, #0x42b0, lsl #16
	dup	v20.4s, w0
	fmin	v4.4s, v18.4s, v20.4s
	mov	w0, #0xaa3b                	// #43579
	movk	w0, #0x3fb8, lsl #16
	dup	v20.4s, w0
	fmul	v18.4s, v4.4s, v20.4s
	frintn	v18.4s, v18.4s
	mov	w0, #0x8083                	// #32899
	movk	w0, #0x395e, lsl #16
	dup	v20.4s, w0
	mov	w0, #0x8000                	// #32768
	movk	w0, #0xbf31, lsl #16
	dup	v21.4s, w0
	fmla	v4.4s, v18.4s, v21.4s
	fmla	v4.4s, v18.4s, v20.4s
	mov	w0, #0x43ce                	// #17358
	movk	w0, #0x3ab7, lsl #16
	dup	v20.4s, w0
	fmla	v20.4s, v19.4s, v4.4s
	mov	w0, #0x8908                	// #35080
	movk	w0, #0x3c08, lsl #16
	dup	v19.4s, w0
	fmla	v19.4s, v20.4s, v4.4s
	mov	w0, #0xa9c1                	// #43457
	movk	w0, #0x3d2a, lsl #16
	dup	v20.4s, w0
	fmla	v20.4s, v19.4s, v4.4s
	mov	w0, #0xaaaa                	// #43690
	movk	w0, #0x3e2a, lsl #16
	dup	v21.4s, w0
	fmla	v21.4s, v20.4s, v4.4s
	movi	v19.4s, #0x3f, lsl #24
	fmla	v19.4s, v21.4s, v4.4s
	fmul	v21.4s, v4.4s, v4.4s
	fmov	v20.4s, #1.000000000000000000e+00
	fadd	v20.4s, v4.4s, v20.4s
	fmla	v20.4s, v19.4s, v21.4s
	fcvtzs	v18.4s, v18.4s
	movi	v19.4s, #0x7f
	add	v18.4s, v18.4s, v19.4s
	shl	v18.4s, v18.4s, #23
	fmul	v18.4s, v20.4s, v18.4s
	bsl	v31.16b, v16.16b, v18.16b
	mov	s18, v0.s[1]
	fadd	s18, s0, s18
	mov	s19, v0.s[2]
	mov	s20, v0.s[3]
	fadd	s19, s19, s20
	fadd	s18, s18, s19
	fmadd	s17, s17, s31, s18
	str	s17, [x19, #12]
	str	s31, [x19, #24]
	add	x15, x15, #0x1
	b	<kiln_v5_attend+0x158>
	ldr	q20, [x19, x21, lsl #4]
	add	x0, sp, #0x110
	ldr	s21, [x0, x15, lsl #2]
	mov	s22, v1.s[1]
	fmax	s22, s1, s22
	mov	s23, v1.s[2]
	mov	s24, v1.s[3]
	fmax	s23, s23, s24
	fmax	s22, s22, s23
	fmax	s21, s21, s22
	dup	v21.4s, v21.s[0]
	fsub	v20.4s, v20.4s, v21.4s
	mov	w0, #0x999a                	// #39322
	movk	w0, #0xc2ae, lsl #16
	dup	v23.4s, w0
	fcmgt	v2.4s, v23.4s, v20.4s
	mov	w0, #0x6967                	// #26983
	movk	w0, #0x3950, lsl #16
	dup	v22.4s, w0
	fmax	v20.4s, v20.4s, v23.4s
	mov	w0, #0x999a                	// #39322
	movk	w0, #0x42b0, lsl #16
	dup	v23.4s, w0
	fmin	v7.4s, v20.4s, v23.4s
	mov	w0, #0xaa3b                	// #43579
	movk	w0, #0x3fb8, lsl #16
	dup	v23.4s, w0
	fmul	v20.4s, v7.4s, v23.4s
	frintn	v20.4s, v20.4s
	mov	w0, #0x8083                	// #32899
	movk	w0, #0x395e, lsl #16
	dup	v23.4s, w0
	mov	w0, #0x8000                	// #32768
	movk	w0, #0xbf31, lsl #16
	dup	v24.4s, w0
	fmla	v7.4s, v20.4s, v24.4s
	fmla	v7.4s, v20.4s, v23.4s
	mov	w0, #0x43ce                	// #17358
	movk	w0, #0x3ab7, lsl #16
	dup	v19.4s, w0
	fmla	v19.4s, v22.4s, v7.4s
	mov	w0, #0x8908                	// #35080
	movk	w0, #0x3c08, lsl #16
	dup	v21.4s, w0
	fmla	v21.4s, v19.4s, v7.4s
	mov	w0, #0xa9c1                	// #43457
	movk	w0, #0x3d2a, lsl #16
	dup	v19.4s, w0
	fmla	v19.4s, v21.4s, v7.4s
	mov	w0, #0xaaaa                	// #43690
	movk	w0, #0x3e2a, lsl #16
	dup	v21.4s, w0
	fmla	v21.4s, v19.4s, v7.4s
	movi	v19.4s, #0x3f, lsl #24
	fmla	v19.4s, v21.4s, v7.4s
	fmul	v22.4s, v7.4s, v7.4s
	fmov	v21.4s, #1.000000000000000000e+00
	fadd	v21.4s, v7.4s, v21.4s
	fmla	v21.4s, v19.4s, v22.4s
	fcvtzs	v20.4s, v20.4s
	movi	v22.4s, #0x7f
	add	v20.4s, v20.4s, v22.4s
	shl	v20.4s, v20.4s, #23
	fmul	v20.4s, v21.4s, v20.4s
	bsl	v2.16b, v16.16b, v20.16b
	str	q2, [x19, x21, lsl #4]
	add	x21, x21, #0x1
	fadd	v0.4s, v0.4s, v2.4s
	b	<kiln_v5_attend+0x2ac>
	add	x0, x21, #0x1
	ldr	q22, [x19, x21, lsl #4]
	fmax	v1.4s, v1.4s, v22.4s
	mov	x21, x0
	b	<kiln_v5_attend+0x298>
	mov	x19, #0x0                   	// #0
	add	x0, x13, #0x1
	sub	x0, x0, x12, lsl #6
	mov	x23, #0x40                  	// #64
	cmp	x0, x23
	csel	x24, x0, x23, lt	// lt = tstop
	lsr	x25, x24, #2
	cmp	x19, x25
	b.lt	<kiln_v5_attend+0x5ec>  // b.tstop
	and	x19, x24, #0xfffffffffffffffc
	cmp	x19, x24
	b.lt	<kiln_v5_attend+0x54c>  // b.tstop
	add	x15, x15, #0x1
	b	<kiln_v5_attend+0x14c>
	add	x0, x26, x11, lsl #8
	add	x22, x0, x10, lsl #6
	lsl	x23, x15, #6
	add	x20, x22, x15, lsl #6
	ldr	q31, [x20, #32]
	add	x0, x5, x10, lsl #6
	add	x0, x0, x12, lsl #14
	lsl	x25, x19, #8
	add	x21, x0, x19, lsl #8
	ldr	q0, [x21, #32]
	ldr	q1, [x22, x23]
	ldr	q2, [x0, x25]
	movi	v23.16b, #0x0
	mov	v30.16b, v23.16b
	fmla	v30.4s, v1.4s, v2.4s
	fmla	v30.4s, v31.4s, v0.4s
	ldr	q31, [x20, #48]
	ldr	q0, [x21, #48]
	ldr	q1, [x20, #16]
	ldr	q2, [x21, #16]
	fmla	v23.4s, v1.4s, v2.4s
	fmla	v23.4s, v31.4s, v0.4s
	fadd	v31.4s, v30.4s, v23.4s
	uzp1	v0.2d, v31.2d, v31.2d
	uzp2	v1.2d, v31.2d, v31.2d
	fadd	v0.4s, v0.4s, v1.4s
	uzp1	v1.2d, v31.2d, v31.2d
	uzp2	v31.2d, v31.2d, v31.2d
	fadd	v31.4s, v1.4s, v31.4s
	uzp1	v1.4s, v0.4s, v31.4s
	uzp2	v31.4s, v0.4s, v31.4s
	fadd	v31.4s, v1.4s, v31.4s
	fmov	v0.4s, #2.500000000000000000e-01
	fmul	v31.4s, v31.4s, v0.4s
	mov	x0, sp
	mov	x20, #0x110                 	// #272
	madd	x0, x15, x20, x0
	str	s31, [x0, x19, lsl #2]
	add	x19, x19, #0x1
	b	<kiln_v5_attend+0x53c>
	add	x0, x26, x11, lsl #8
	add	x22, x0, x10, lsl #6
	lsl	x23, x15, #6
	add	x21, x22, x15, lsl #6
	ldr	q0, [x21, #32]
	add	x0, x5, x10, lsl #6
	add	x0, x0, x12, lsl #14
	lsl	x27, x19, #10
	add	x20, x0, x19, lsl #10
	ldr	q3, [x20, #32]
	ldr	q2, [x22, x23]
	ldr	q4, [x0, x27]
	movi	v1.16b, #0x0
	mov	v5.16b, v1.16b
	fmla	v5.4s, v2.4s, v4.4s
	fmla	v5.4s, v0.4s, v3.4s
	ldr	q3, [x21, #48]
	ldr	q6, [x20, #48]
	ldr	q4, [x21, #16]
	ldr	q7, [x20, #16]
	mov	v16.16b, v1.16b
	fmla	v16.4s, v4.4s, v7.4s
	fmla	v16.4s, v3.4s, v6.4s
	fadd	v5.4s, v5.4s, v16.4s
	ldr	q7, [x20, #288]
	ldr	q16, [x20, #256]
	mov	v6.16b, v1.16b
	fmla	v6.4s, v2.4s, v16.4s
	fmla	v6.4s, v0.4s, v7.4s
	ldr	q7, [x20, #304]
	ldr	q16, [x20, #272]
	mov	v17.16b, v1.16b
	fmla	v17.4s, v4.4s, v16.4s
	fmla	v17.4s, v3.4s, v7.4s
	fadd	v6.4s, v6.4s, v17.4s
	uzp1	v7.2d, v5.2d, v6.2d
	uzp2	v5.2d, v5.2d, v6.2d
	fadd	v5.4s, v7.4s, v5.4s
	ldr	q7, [x20, #544]
	ldr	q16, [x20, #512]
	mov	v6.16b, v1.16b
	fmla	v6.4s, v2.4s, v16.4s
	fmla	v6.4s, v0.4s, v7.4s
	ldr	q7, [x20, #560]
	ldr	q16, [x20, #528]
	mov	v17.16b, v1.16b
	fmla	v17.4s, v4.4s, v16.4s
	fmla	v17.4s, v3.4s, v7.4s
	fadd	v6.4s, v6.4s, v17.4s
	ldr	q16, [x20, #800]
	ldr	q17, [x20, #768]
	mov	v7.16b, v1.16b
	fmla	v7.4s, v2.4s, v17.4s
	fmla	v7.4s, v0.4s, v16.4s
	ldr	q0, [x20, #816]
	ldr	q2, [x20, #784]
	fmla	v1.4s, v4.4s, v2.4s
	fmla	v1.4s, v3.4s, v0.4s
	fadd	v0.4s, v7.4s, v1.4s
	uzp1	v1.2d, v6.2d, v0.2d
	uzp2	v0.2d, v6.2d, v0.2d
	fadd	v0.4s, v1.4s, v0.4s
	uzp1	v1.4s, v5.4s, v0.4s
	uzp2	v0.4s, v5.4s, v0.4s
	fadd	v0.4s, v1.4s, v0.4s
	fmov	v1.4s, #2.500000000000000000e-01
	fmul	v0.4s, v0.4s, v1.4s
	mov	x0, sp
	mov	x20, #0x110                 	// #272
	madd	x0, x15, x20, x0
	str	q0, [x0, x19, lsl #4]
	add	x19, x19, #0x1
	b	<kiln_v5_attend+0x530>
	movi	v0.16b, #0x0
	ldr	x0, [x3, #8]
	sub	x0, x0, x4, lsl #8
	add	x13, x11, x4
	add	x0, x0, x13, lsl #8
	add	x13, x0, x10, lsl #6
	lsl	x14, x12, #6
	add	x0, x13, x12, lsl #6
	str	q0, [x13, x14]
	str	q0, [x0, #16]
	str	q0, [x0, #32]
	str	q0, [x0, #48]
	mov	w0, #0xff800000            	// #-8388608
	fmov	s0, w0
	add	x13, sp, #0x110
	add	x0, x13, x12, lsl #2
	str	s0, [x13, x12, lsl #2]
	movi	v0.2s, #0x0
	str	s0, [x0, #12]
	add	x12, x12, #0x1
	b	<kiln_v5_attend+0xa8>
	udf	#49439
	udf	#49439
	udf	#49439
	udf	#49439

<kiln_run>:
	stp	x29, x30, [sp, #-16]!
	mov	x29, sp
	stp	x21, x25, [sp, #-16]!
	mov	x21, x0
	ldr	x3, [x0, #56]
	ldr	x0, [x0, #64]
	adrp	x1, <kiln_v1_rms_norm_norm>
	ldr	x1, [x1]
	mov	x2, x21
	blr	x3
	mov	x25, x21
	ldr	x3, [x25, #56]
	ldr	x0, [x25, #64]
	adrp	x1, <kiln_v2_matmul_q4>
	ldr	x1, [x1]
	mov	x2, x25
	blr	x3
	ldr	x3, [x25, #56]
	ldr	x0, [x25, #64]
	adrp	x1, <kiln_v3_matmul_q8>
	ldr	x1, [x1]
	mov	x2, x25
	blr	x3
	ldr	x3, [x25, #56]
	ldr	x0, [x25, #64]
	adrp	x1, <kiln_v4_rope>
	ldr	x1, [x1]
	mov	x2, x25
	blr	x3
	ldr	x3, [x25, #56]
	ldr	x0, [x25, #64]
	adrp	x1, <kiln_v5_kv_store>
	ldr	x1, [x1]
	mov	x2, x25
	blr	x3
	ldr	x3, [x25, #56]
	ldr	x0, [x25, #64]
	adrp	x1, <kiln_v5_attend>
	ldr	x1, [x1]
	mov	x2, x25
	blr	x3
	ldp	x21, x25, [sp], #16
	ldp	x29, x30, [sp], #16
	ret
